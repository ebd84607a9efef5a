#!/usr/bin/env bash
# Copy a study session's small reports into docs (what docs/results-*.md cite): the session's rounds.json,
# gate-q2.md, progress map, event log, manifest and lineage; each round's gate-q0.md, dose, walk-down, round
# record, heal log, gate-Q1 report and control arms; the sweep's gate-Q1 report and each arm's heal log. No weights, no completions.
#
#   scripts/study_publish.sh SESSION DEST
set -euo pipefail
session=${1:?usage: scripts/study_publish.sh SESSION DEST}
dest=${2:?usage: scripts/study_publish.sh SESSION DEST}
mkdir -p "$dest"
for f in rounds.json gate-q2.md progress.png progress.svg events.jsonl session.toml lineage.json; do
  [ -f "$session/$f" ] && cp "$session/$f" "$dest/"
done
for r in "$session"/round-*; do
  name=$(basename "$r")
  [ "$name" = round-00 ] && continue
  mkdir -p "$dest/$name"
  for f in gate-q0.md dose.json walkdown.json round.json controls.json; do
    [ -f "$r/$f" ] && cp "$r/$f" "$dest/$name/"
  done
  for f in heal.json gate-q1.json gate-q1.md; do
    [ -f "$r/heal/$f" ] && cp "$r/heal/$f" "$dest/$name/"
  done
done
if [ -d "$session/sweep-r1" ]; then
  for f in gate-q1.md gate-q1.json; do
    [ -f "$session/sweep-r1/$f" ] && cp "$session/sweep-r1/$f" "$dest/sweep-r1-$f"
  done
  for arm in "$session"/sweep-r1/sweep/*/; do
    [ -f "$arm/heal.json" ] && cp "$arm/heal.json" "$dest/sweep-r1-$(basename "$arm")-heal.json"
  done
fi
echo "copied $(find "$dest" -type f | wc -l) files into $dest"
