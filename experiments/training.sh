#!/usr/bin/env bash
# Training-time steering on a real model (docs/training.md). What was run for docs/training.md:
#   1. the Assistant Axis (`steerable axis`) the persona trait is measured along;
#   2. plain LoRA fine-tuning on persona-sft (role-data questions, no system prompt, answered in character;
#      3 seeds) and on its control persona-sft-assistant (the same questions answered as the Assistant): does
#      plain fine-tuning move the model along the axis and change its replies? (issue 16's gating criterion)
#   3. the method comparison on persona-sft, the same budget, one result file per method (METHODS; partial:
#      docs/training.md says which ran);
#   4. (SYCO=1) the earlier sycophancy-sft attempt along the CAA sycophancy direction;
#   5. (BENCH=1) the speed bench (bench/train.py).
#   MODEL=smollm2-135m SEEDS=0,1,2 METHODS="preventative aux" bash experiments/training.sh
# persona-sft's rows are bundled (steerable/data/sets/persona_sft.jsonl); they were written from smollm2-135m's
# axis answers by: python experiments/make_persona_sft.py --responses runs/h16/smollm2-135m-axis.responses.jsonl
set -euo pipefail
export OMP_WAIT_POLICY=PASSIVE
MODEL=${MODEL:-smollm2-135m}
STEPS=${STEPS:-36}
SEEDS=${SEEDS:-0,1,2}
LR=${LR:-1e-3}
BS=${BS:-8}
LEN=${LEN:-160}
OUT=${OUT:-experiments/results/training}
METHODS=${METHODS:-"preventative aux contrastive caft actreg combined"}
mkdir -p "$OUT" runs/h16
AXIS=runs/h16/$MODEL-axis.safetensors
[ -f "$AXIS" ] || nice -n 5 steerable axis --model "$MODEL" --out "$AXIS" --bootstrap 0
TRAIT=(nice -n 5 python experiments/train_trait.py --model "$MODEL" --trait axis --vector "$AXIS" --steps "$STEPS"
       --batch-size "$BS" --lr "$LR" --max-length "$LEN")
[ -f "$OUT/$MODEL-persona-sft.json" ] || "${TRAIT[@]}" --data persona-sft --seeds "$SEEDS" \
    --out "$OUT/$MODEL-persona-sft.json"
[ -f "$OUT/$MODEL-persona-sft-assistant.json" ] || "${TRAIT[@]}" --data persona-sft-assistant --seeds 0 \
    --out "$OUT/$MODEL-persona-sft-assistant.json"
# λ sized to the terms' scale on the base model over persona-sft (per response token, layers 16-19 of
# smollm2: aux ≈ 400, actreg ≈ 17 000), so each weighted term starts near the task loss (~1); contrastive starts
# at 0 and grows with the movement. Preventative adds −0.5 × (μ_Assistant − μ_roles) (toward the roles) at the
# axis's cap layers during training only; CAFT ablates the axis there during training only.
for m in $METHODS; do
  case $m in
    aux) extra=(--lam 0.001) ;;
    actreg) extra=(--lam 2e-5) ;;
    contrastive) extra=(--lam 0.01) ;;
    combined) extra=(--lam 0.001 --lam-reg 2e-5) ;;
    preventative) extra=(--strength -0.5) ;;
    caft) extra=() ;;
    *) echo "unknown method $m" >&2; exit 2 ;;
  esac
  [ -f "$OUT/$MODEL-persona-sft-$m.json" ] || "${TRAIT[@]}" --data persona-sft --seeds "$SEEDS" --method "$m" \
      "${extra[@]}" --out "$OUT/$MODEL-persona-sft-$m.json"
done
if [ "${SYCO:-0}" = 1 ]; then
  VEC=runs/h16/$MODEL-sycophancy.safetensors
  [ -f "$VEC" ] || nice -n 5 steerable calibrate --model "$MODEL" --pairs caa-sycophancy --position response-mean \
      --limit 300 --out "$VEC"
  nice -n 5 python experiments/train_trait.py --model "$MODEL" --vector "$VEC" --layer 18 --data sycophancy-sft \
      --seeds "$SEEDS" --batch-size 4 --n-eval 48 --steps 20 --lr 2e-3 --max-length 320 \
      --out "$OUT/$MODEL-sycophancy-sft.json"
fi
if [ "${BENCH:-0}" = 1 ]; then
  nice -n 5 python bench/train.py --model "$MODEL" --max-length 320 --rounds 2 --steps 4 --batch-size 2
  nice -n 5 python bench/train.py --model "$MODEL" --rounds 0 --batch-size 2   # + the isolated per-step costs
fi
