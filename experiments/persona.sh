#!/usr/bin/env bash
# Persona stabilisation on a real model (docs/persona.md): the Assistant Axis from the role data, a capping
# threshold sweep on persona-framed harmful requests (with plain addition of the axis for comparison), and
# drift over the held-out conversation scripts with and without capping.
#   MODEL=smollm2-135m LIMIT=40 bash experiments/persona.sh
#   MODEL=qwen2.5-0.5b LIMIT=24 FLOORS=p10,p25,p50,p75 STRENGTHS=0.5,1,2 bash experiments/persona.sh
set -euo pipefail
MODEL=${MODEL:-smollm2-135m}
LIMIT=${LIMIT:-40}
FLOORS=${FLOORS:-p1,p10,p25,p50,p75,p90}
STRENGTHS=${STRENGTHS:-0.25,0.5,1,2}
BANDS=${BANDS:-p5:p95,p25:p75}
TOKENS=${TOKENS:-48}
# capability: word analogies for smollm2 (at chance on MMLU), MMLU cue+cal for qwen (docs/results.md)
CAPABILITY=${CAPABILITY:---mmlu 18 --capability-task analogies --capability-format choice-loglik}
OUT=${OUT:-experiments/results/persona/$MODEL}
mkdir -p "$OUT" runs
AXIS=runs/$MODEL-axis.safetensors
[ -f "$AXIS" ] || steerable axis --model "$MODEL" --out "$AXIS" | tee "$OUT/axis.txt"
cp "${AXIS%.safetensors}.report.json" "$OUT/axis.report.json"
CAP=$(python -c "import json,sys; from steerable.directions.artifact import load_directions as l; print(l(sys.argv[1]).meta['axis']['cap_layers'])" "$AXIS")

# threshold sweep: floor caps and bands (seed 000) at percentiles of the Assistant's own projections, and add α·(axis) for comparison
# shellcheck disable=SC2086
steerable sweep --model "$MODEL" --vector "$AXIS" --method cap,add --cap-floors "$FLOORS" --cap-bands "$BANDS" --strengths "$STRENGTHS" \
    --layers "$CAP" --prompts persona-harmful:all --benign benign:test --limit "$LIMIT" --behaviour refusal \
    $CAPABILITY --max-new-tokens "$TOKENS" --out "$OUT/cap_sweep.jsonl"
steerable report "$OUT/cap_sweep.jsonl" --out "$OUT/cap_report" --criterion f1

# drift over the held-out scripts, all conditions in one batch: unsteered, floor caps at p10/p25/p50 (p25 is the
# Assistant Axis paper's), seed 000's band p5-p95, and plain addition of the axis (alpha 0.5)
plan() { echo "{\"vector\": \"$AXIS\", \"layers\": \"$CAP\", $2}" > "runs/$MODEL-$1.json"; echo "--plan runs/$MODEL-$1.json"; }
PLANS="$(plan cap-p10 '"method": "cap", "cap_floor": "p10"') $(plan cap-p25 '"method": "cap", "cap_floor": "p25"')
 $(plan cap-p50 '"method": "cap", "cap_floor": "p50"') $(plan band-p5-p95 '"method": "cap", "cap_floor": "p5", "cap_ceiling": "p95"')
 $(plan add-0.5 '"method": "add", "strength": 0.5')"
# shellcheck disable=SC2086
steerable drift --model "$MODEL" --axis "$AXIS" --conversations roles:test --out "$OUT/drift" --baseline $PLANS \
    --max-new-tokens 64 | tee "$OUT/drift.txt"
