#!/usr/bin/env bash
# Side by side, in one run on one machine: LoRA training steps per second of loragate and of
# diffusers + PEFT (tiny-sd, rank 8, attention targets, batch 4, 128 px, fp32 CPU, AdamW).
# Needs a Python with torch, diffusers, transformers, tokenizers, safetensors and peft: set
# PYTHON (default python3). Prints a Markdown table for docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-40}
RUNS=${RUNS:-5}
cargo build --release --example train_speed >/dev/null 2>&1
# RUNS alternating runs of each (a shared machine's load drifts); medians of steps per second.
ours=() peer=()
for _ in $(seq "$RUNS"); do
  # The CLI's default: one element-wise thread (see docs/performance.md).
  ours+=("$(CANDLE_NUM_THREADS=${CANDLE_NUM_THREADS:-1} ./target/release/examples/train_speed "$STEPS" | tail -1)")
  peer+=("$("$PYTHON" benches/peer/peft_train_step.py assets/tinyworld "$STEPS" 2>/dev/null | tail -1)")
done
"$PYTHON" - "${#ours[@]}" "${ours[@]}" "${peer[@]}" <<'PY'
import json, statistics, sys
n = int(sys.argv[1])
ours = [json.loads(a) for a in sys.argv[2:2 + n]]
peer = [json.loads(a) for a in sys.argv[2 + n:]]
o = statistics.median(r["steps_per_s"] for r in ours)
p = statistics.median(r["steps_per_s"] for r in peer)
print(f"| | loragate | PyTorch {peer[0]['torch']} + diffusers + PEFT ({peer[0]['threads']} threads) | loragate speed / peer speed |")
print("|---|---|---|---|")
print(f"| training steps/s, median of {n} | {o:.2f} | {p:.2f} | {o / p:.2f} |")
PY
