#!/usr/bin/env bash
# The matched-loss comparison of docs/training.md ("Matched task loss, capping on top, capability, coherence"):
# each setting below is one experiments/train_trait.py run (3 seeds) that also measures coherence, capability
# (252 word analogies, choice-loglik) and the inference-time p25 cap on top of the fine-tuned model (seed 000
# exp. 5). SETTINGS is a list of METHOD:LAMBDA:LAMBDA_REG:STRENGTH[:LAYERS[:STEPS]] (LAYERS: the method's layers,
# e.g. 19, default the axis's cap layers; STEPS: training steps, default 36); METHOD caft-mean is CAFT with
# --caft-ablation mean (h·â set to the Assistant mean, not 0). LANES runs that many at once (one thread each).
# EXTRA: more train_trait.py flags (qwen2.5-0.5b: "--capability-task mmlu --capability 6", its capability measure).
#   LANES=2 bash experiments/training_matched.sh            # what docs/training.md ran, then
#   python experiments/training_table.py --results experiments/results/training_v2
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MODEL=${MODEL:-smollm2-135m}
OUT=${OUT:-experiments/results/training_v2}
LANES=${LANES:-2}
SETTINGS=${SETTINGS:-"none:0:0:0 aux:2e-4:0:0 preventative:0:0:-0.1 contrastive:0.01:0:0 actreg:1e-5:0:0 combined:1.5e-4:5e-6:0"}
AXIS=runs/h16/$MODEL-axis.safetensors
[ -f "$AXIS" ] || steerable axis --model "$MODEL" --out "$AXIS" --bootstrap 0
mkdir -p "$OUT" runs/h16/logs
run() {
  IFS=: read -r m lam reg a layers steps <<< "$1"
  local name="$MODEL-persona-sft" extra=(--method "$m")
  case $m in
    none) ;;
    aux|actreg|contrastive) name+="-$m-lam$lam"; extra+=(--lam "$lam") ;;
    combined) name+="-$m-lam$lam-reg$reg"; extra+=(--lam "$lam" --lam-reg "$reg") ;;
    preventative) name+="-$m-a$a"; extra+=(--strength "$a") ;;
    caft) name+="-$m" ;;
    caft-mean) name+="-$m"; extra=(--method caft --caft-ablation mean) ;;
    *) echo "unknown method $m" >&2; return 2 ;;
  esac
  if [ -n "$layers" ]; then name+="-L$layers"; extra+=(--layers "$layers"); fi
  if [ -n "$steps" ]; then name+="-s$steps"; fi
  [ -f "$OUT/$name.json" ] && return 0
  nice -n 5 python experiments/train_trait.py --model "$MODEL" --trait axis --vector "$AXIS" --steps "${steps:-36}" \
      --batch-size 8 --lr 1e-3 --max-length 160 --data persona-sft --seeds "${SEEDS:-0,1,2}" "${extra[@]}" \
      ${EXTRA:-} --out "$OUT/$name.json" > "runs/h16/logs/$name.log" 2>&1
}
export -f run; export MODEL OUT AXIS EXTRA
printf '%s\n' $SETTINGS | xargs -P "$LANES" -I{} bash -c 'run {}'
