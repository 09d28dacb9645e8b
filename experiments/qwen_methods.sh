#!/usr/bin/env bash
# Refusal removal on qwen2.5-0.5b: add, ablate, SAS, AAS and rotate, on discriminative vs all layers
# (docs/results.md). Needs the behaviour-labelled direction:
#   python experiments/qwen_refusal_labels.py
#   steerable calibrate --model qwen2.5-0.5b --positive runs/qwen-refused.jsonl \
#       --negative runs/qwen-complied.jsonl --position last --out runs/qwen-refusal-behav.safetensors
set -euo pipefail
OUT=${OUT:-experiments/results/qwen_methods.jsonl}
COMMON=(--model qwen2.5-0.5b --vector runs/qwen-refusal-behav.safetensors --direction global
        --layers discriminative,all --prompts advbench:test --benign benign:test --limit 32
        --behaviour compliance --max-new-tokens 32)
steerable sweep "${COMMON[@]}" --method add --strengths=-0.1,-0.25,-0.5,-1,-2 --out "$OUT"
steerable sweep "${COMMON[@]}" --method ablate,angular,angular-adaptive,rotate --angles 90,180,270 --out "$OUT"
python experiments/qwen_methods_mmlu.py "$OUT" --per-subject "${MMLU_PER_SUBJECT:-6}"
steerable report "$OUT" --out experiments/results/qwen_methods_report --criterion angle
