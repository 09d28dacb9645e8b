#!/usr/bin/env bash
# Training-time steering on a real model (docs/training.md). What was run for docs/training.md:
#   1. the sycophancy direction (CAA pairs, response-mean) the trait is measured along;
#   2. plain LoRA fine-tuning on sycophancy-sft (3 seeds) and on its honest control (1 seed): does plain
#      fine-tuning move the model along the direction and change its A/B behaviour?
#   3. the speed bench (bench/train.py).
# The method comparison (every method at matched task loss, two models, ≥ 3 seeds, capping on top) is NOT in
# this script yet: docs/training.md says what it needs.
#   MODEL=smollm2-135m STEPS=40 SEEDS=0,1,2 bash experiments/training.sh
set -euo pipefail
export OMP_WAIT_POLICY=PASSIVE
MODEL=${MODEL:-smollm2-135m}
STEPS=${STEPS:-20}
SEEDS=${SEEDS:-0,1,2}
LR=${LR:-2e-3}
LEN=${LEN:-320}
OUT=${OUT:-experiments/results/training}
mkdir -p "$OUT" runs/h16
VEC=runs/h16/$MODEL-sycophancy.safetensors
[ -f "$VEC" ] || nice -n 5 steerable calibrate --model "$MODEL" --pairs caa-sycophancy --position response-mean \
    --limit 300 --out "$VEC"
nice -n 5 python experiments/train_trait.py --model "$MODEL" --vector "$VEC" --layer 18 --data sycophancy-sft --seeds "$SEEDS" --batch-size 4 --n-eval 48 \
    --steps "$STEPS" --lr "$LR" --max-length "$LEN" --out "$OUT/$MODEL-sycophancy-sft.json"
nice -n 5 python experiments/train_trait.py --model "$MODEL" --vector "$VEC" --layer 18 --data sycophancy-sft-honest --seeds 0 --batch-size 4 --n-eval 48 \
    --steps "$STEPS" --lr "$LR" --max-length "$LEN" --out "$OUT/$MODEL-sycophancy-sft-honest.json"
nice -n 5 python bench/train.py --model "$MODEL" --max-length "$LEN" --rounds 2 --steps 4 --batch-size 2
nice -n 5 python bench/train.py --model "$MODEL" --rounds 0 --batch-size 2   # + the isolated per-step costs
