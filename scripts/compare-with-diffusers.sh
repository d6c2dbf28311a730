#!/usr/bin/env bash
# Side by side, in one run on one machine: loragate and PyTorch + diffusers doing the same
# txt2img work (tiny-sd, 128x128, 20 DDIM steps, guidance 5, batch 1, 4 and 8, fp32 CPU).
# Needs a Python with torch, diffusers, transformers, tokenizers and safetensors: set PYTHON
# (default python3). Prints a Markdown table for the README.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
cargo build --release --example txt2img_median >/dev/null 2>&1
ours=$(./target/release/examples/txt2img_median)
peer=$("$PYTHON" benches/peer/diffusers_txt2img.py assets/tinyworld 2>/dev/null | tail -1)
"$PYTHON" - "$ours" "$peer" <<'PY'
import json, sys
ours, peer = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"| | loragate | PyTorch {peer['torch']} + diffusers ({peer['threads']} threads) | loragate time / peer time |")
print("|---|---|---|---|")
for b in (1, 4, 8):
    o, p = ours[f"batch{b}_s"], peer[f"batch{b}_s"]
    print(f"| batch {b} | {o:.2f} s | {p:.2f} s | {o / p:.2f} |")
PY
