#!/usr/bin/env bash
# Refusal induction on smollm2-135m with over-refusal on benign prompts (docs/results.md): add and cap
# (a floor on the refusal coordinate) on layers 9-11 and 5-15, then the operating point by tune.
# STEP=tune runs only the tune step (its lines carry coherent compliance and the capability measure).
set -euo pipefail
STEP=${STEP:-all}
VEC=runs/smollm2-refusal.safetensors
OUT=${OUT:-experiments/results/smollm2_induction.jsonl}
# capability: smollm2 is at chance on MMLU, so the word analogies (docs/results.md, "Capability measure")
CAPABILITY=${CAPABILITY:---mmlu 18 --capability-task analogies --capability-format choice-loglik}
[ -f "$VEC" ] || steerable calibrate --model smollm2-135m --pairs refusal-pairs --position response-mean --out "$VEC"
# shellcheck disable=SC2086
[ "$STEP" = tune ] || steerable sweep --model smollm2-135m --vector "$VEC" --method add,cap --strengths 0.25,0.5,1,1.5 \
    --cap-floors p10,p50,p90 --layers "9-11;5-15" --prompts advbench:test --benign benign:test --limit 48 \
    --behaviour refusal --max-new-tokens 40 $CAPABILITY --out "$OUT"
[ "$STEP" = tune ] || steerable report "$OUT" --out experiments/results/smollm2_induction_report --max-over-refusal 0.05
# tune's capability budget: at most MAX_CAPABILITY_DROP (default 5 points) lost on the same analogy items
# shellcheck disable=SC2086
steerable tune --model smollm2-135m --vector "$VEC" --method add --strengths 0.25,0.5,1 \
    --layers "9-11;5-15" --prompts advbench:test --benign benign:test --limit 48 --max-new-tokens 40 $CAPABILITY \
    --max-kl 1.5 --max-over-refusal 0.1 --max-capability-drop "${MAX_CAPABILITY_DROP:-0.05}" --out experiments/results/smollm2_tuned_plan.json \
    --results experiments/results/smollm2_tune.jsonl
