#!/usr/bin/env bash
# Side by side, in one run on one machine: LoRA training steps per second of loragate and of
# diffusers + PEFT (tiny-sd, rank 8, attention targets, batch 4, 128 px, fp32 CPU, AdamW).
# Needs a Python with torch, diffusers, transformers, tokenizers, safetensors and peft: set
# PYTHON (default python3). Prints a Markdown table for the README.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-40}
cargo build --release --example train_speed >/dev/null 2>&1
# The CLI's default: one element-wise thread (see the README's trainer section).
ours=$(CANDLE_NUM_THREADS=${CANDLE_NUM_THREADS:-1} ./target/release/examples/train_speed "$STEPS" | tail -1)
peer=$("$PYTHON" benches/peer/peft_train_step.py assets/tinyworld "$STEPS" 2>/dev/null | tail -1)
"$PYTHON" - "$ours" "$peer" <<'PY'
import json, sys
ours, peer = json.loads(sys.argv[1]), json.loads(sys.argv[2])
o, p = ours["steps_per_s"], peer["steps_per_s"]
print(f"| | loragate | PyTorch {peer['torch']} + diffusers + PEFT ({peer['threads']} threads) | loragate speed / peer speed |")
print("|---|---|---|---|")
print(f"| training steps/s | {o:.2f} | {p:.2f} | {o / p:.2f} |")
PY
