#!/usr/bin/env bash
# Per-user steering on a real model (docs/personalisation.md, issue 15, seed 002): a profile library fitted on
# users-caa's training pairs, then held-out choice accuracy of every condition, the α sweeps (population and
# composed vectors separately), the prompt+first:K gating comparison, capability and a generation check.
#   MODEL=smollm2-135m bash experiments/users.sh
#   MODEL=qwen2.5-0.5b LIMIT=160 TUNE=48 bash experiments/users.sh
#   TAU=0.005 SWEEP_POPULATION=1,2,4,8 bash experiments/users.sh     # the prior's τ given instead of chosen
# The 2 shared CPU cores of the project machine make a full run (960 held-out pairs, 2 720 training pairs)
# take hours; LIMIT and TUNE cap the held-out and tuning pairs (taken round-robin over users, so every user
# keeps pairs) and the report records both.
set -euo pipefail
MODEL=${MODEL:-smollm2-135m}
LIMIT=${LIMIT:-200}          # held-out pairs scored per condition
TUNE=${TUNE:-48}             # training pairs the α sweep chooses the strengths on
POSITION=${POSITION:-response-mean}  # users-caa's answers are spelled out; answer-token reads their letter
SWEEP_POPULATION=${SWEEP_POPULATION:-0.5,1,2,4}
# composed grids: the population grid rescaled to equal added norms (the default); SWEEP_COMPOSED=2.5,7.5,17.5
# gives seed 002's grid instead
COMPOSED=${SWEEP_COMPOSED:+--sweep-composed $SWEEP_COMPOSED}
GEN=${GEN:-12}
CAP_PER_SUBJECT=${CAP_PER_SUBJECT:-3}
TAU=${TAU:-}                 # empty: users fit chooses τ by held-out likelihood
SUFFIX=${TAU:+-tau$TAU}
OUT=${OUT:-experiments/results/users/$MODEL$SUFFIX}
LIB=runs/users/$MODEL-caa-$POSITION$SUFFIX.safetensors
mkdir -p "$OUT" runs/users
export OMP_WAIT_POLICY=PASSIVE
# shellcheck disable=SC2086
[ -f "$LIB" ] || nice -n 5 steerable users fit --model "$MODEL" --preferences users-caa --out "$LIB" \
    --position "$POSITION" ${TAU:+--tau $TAU} | tee "$OUT/fit.txt"
steerable users show "$LIB" --json > "$OUT/library.json"
# shellcheck disable=SC2086
nice -n 5 steerable users eval --model "$MODEL" --profiles "$LIB" --preferences users-caa --out "$OUT/eval" \
    --limit "$LIMIT" --tune-limit "$TUNE" $COMPOSED --sweep-population "$SWEEP_POPULATION" \
    --gen-prompts "$GEN" --capability-per-subject "$CAP_PER_SUBJECT" | tee "$OUT/eval.txt"
