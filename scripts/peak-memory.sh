#!/usr/bin/env bash
# Peak resident memory (GNU time's "Maximum resident set size") of the portrait suite, cold (in
# an empty cache) and unchanged, and of a short training run of the committed zorb recipe.
# docs/performance.md quotes these; rerun after changes that could grow them.
#
#   scripts/peak-memory.sh            # builds the release binary first
set -euo pipefail
cd "$(dirname "$0")/.."
command -v /usr/bin/time >/dev/null || { echo "needs GNU time at /usr/bin/time" >&2; exit 2; }
cargo build --release --quiet
bin=target/release/loragate
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

peak() { # label, command...
  local label=$1; shift
  /usr/bin/time -v "$@" >"$work/log" 2>&1 || { cat "$work/log" >&2; exit 1; }
  local kb secs
  kb=$(awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$work/log")
  secs=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$work/log")
  printf '%-34s %8.0f MB  %s wall\n' "$label" "$((kb / 1024))" "$secs"
}

export LORAGATE_CACHE="$work/cache"
peak "portrait suite, cold cache" "$bin" suite suites/portrait.yaml --ci --out "$work/out"
peak "portrait suite, unchanged re-run" "$bin" suite suites/portrait.yaml --ci --out "$work/out"

# The zorb recipe's data, then 60 of its steps without validation.
"$bin" world dataset --concept zorb --count 300 --seed 11 --repeats 1 --out "$work/zorb" >/dev/null 2>&1
"$bin" world dataset --count 300 --seed 12 --repeats 1 --out "$work/zorb" >/dev/null 2>&1
sed -e "s|^dataset:.*|dataset: $work/zorb|" -e '/^validation_/d' training/zorb.yaml >"$work/zorb.yaml"
peak "training, zorb recipe, 60 steps" "$bin" train "$work/zorb.yaml" --steps 60 --checkpoint-every 60 --out "$work/train"
