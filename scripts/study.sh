#!/usr/bin/env bash
# The real-size study (issue 15): on one model, the base eval on all 132 classic items (think 64), three rounds of
# ≥ 32 accepted completions (128 new tokens at most), each healed 2 epochs under the default rmse KL barrier, with
# the control arms (steered at c*, norm-matched random vector at c*, prompt-only) evaluated on the same items, then
# the heal sweep (NLL only vs mean-KL vs rmse-KL) on round 1's accepted completions, and the report with
# intervals. Every step resumes: rerun the same command after a crash or Ctrl-C.
#
#   scripts/study.sh MODEL SESSION [BIN]
#
# STUDY_FLOOR (default `--floor-rel 0.95`, the default floor) and STUDY_CONTROLS (default `--controls`; empty to
# skip the control arms) change the rounds step; STUDY_SWEEP=0 skips the sweep.
set -euo pipefail
model=${1:?usage: scripts/study.sh MODEL SESSION [BIN]}
session=${2:?usage: scripts/study.sh MODEL SESSION [BIN]}
bin=${3:-target/release/steer-heal}
persona=personas/authority.toml
started=$(date +%s)
stage() { echo "[study] $1 (elapsed $(( $(date +%s) - started )) s)" >&2; }

stage "1/3 rounds: base eval, 3 rounds with controls"
# shellcheck disable=SC2086 # the knobs are flag lists
"$bin" run --session "$session" --model "$model" --rounds 3 ${STUDY_FLOOR:---floor-rel 0.95} \
  --n-prompts 24 --max-new-tokens 128 --extract-pairs 64 \
  --probe-n 8 --min-keep 32 --max-keep 40 --max-batches 4 \
  --epochs 2 --r 32 --eval-n 132 --think 64 --json-probe-tokens 48 --measure-n 12 ${STUDY_CONTROLS---controls} \
  || echo "[study] the rounds stopped early (see above); the report covers what ran" >&2

if [ "${STUDY_SWEEP:-1}" = 1 ]; then
stage "2/3 heal sweep on round 1: nll, kl_rev mean, kl_rev rmse"
sweep="$session/sweep-r1"
mkdir -p "$sweep"
# Held-out prompts: the persona's prompts the session did not generate from (24 of 36 were used).
python3 - "$persona" "$sweep/held-out.txt" "$sweep/persona.txt" <<'PY'
import sys, tomllib
d = tomllib.load(open(sys.argv[1], "rb"))
open(sys.argv[2], "w").write("\n".join(d["prompts"][24:]) + "\n")
open(sys.argv[3], "w").write(d["positive"])
PY
"$bin" heal --model "$model" --completions "$session/round-01/accepted.jsonl" --out "$sweep" \
  --sweep --sweep-regs nll,kl_rev_mean,kl_rev_rmse --sweep-strengths 0.3 \
  --epochs 2 --r 32 --alpha 64 --lr 5e-4 --grad-accum 2 --max-len 256 \
  --eval-prompts "$sweep/held-out.txt" --eval-n 12 --eval-tokens 32 --persona "$(cat "$sweep/persona.txt")"
fi

stage "3/3 report"
"$bin" report --session "$session"
stage "done"
