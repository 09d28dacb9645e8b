#!/usr/bin/env bash
# The shortened Qwen drift run of docs/persona.md: 8 held-out scripts, 5 turns, unsteered vs a p25 floor cap vs
# adding the axis (the axis comes from `MODEL=qwen2.5-0.5b bash experiments/persona.sh`).
set -euo pipefail
cd "$(dirname "$0")/.."
AXIS=runs/qwen2.5-0.5b-axis.safetensors
OUT=${OUT:-experiments/results/persona/qwen2.5-0.5b}   # the issue 14 rerun: OUT=experiments/results/persona_v2/qwen2.5-0.5b
mkdir -p "$OUT"
echo "{\"vector\": \"$AXIS\", \"method\": \"add\", \"strength\": 1, \"layers\": \"13-16\"}" > runs/qwen2.5-0.5b-add-1.json
echo "{\"vector\": \"$AXIS\", \"method\": \"cap\", \"cap_floor\": \"p25\", \"layers\": \"13-16\"}" > runs/qwen2.5-0.5b-cap-p25.json
steerable drift --model qwen2.5-0.5b --axis "$AXIS" --conversations roles:test --limit 8 \
    --max-turns 5 --max-new-tokens 48 --out "$OUT/drift" --baseline \
    --plan runs/qwen2.5-0.5b-cap-p25.json --plan runs/qwen2.5-0.5b-add-1.json | tee "$OUT/drift.txt"
