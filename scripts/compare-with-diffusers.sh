#!/usr/bin/env bash
# Side by side, in one run on one machine: loragate and PyTorch + diffusers doing the same
# txt2img work (tiny-sd, 128x128, 20 DDIM steps, guidance 5, batch 1, 4 and 8, fp32 CPU).
# Needs a Python with torch, diffusers, transformers, tokenizers and safetensors: set PYTHON
# (default python3). Prints a Markdown table for docs/performance.md.
#
# FULL_SIZE=1 adds SD 1.5's architecture with random weights (its published configs, written by
# diffusers; speed does not depend on weight values) at 512x512 in fp32 on the CPU: one guided
# step (a UNet call on 2 rows, median of CALLS=2) and the rest of an image's cost (text encoder,
# VAE decode: a 2-step txt2img minus two steps), plus the model load. About 10 minutes on 2 cores.
# TINY=0 skips the tiny-sd rows.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ "${TINY:-1}" = 1 ]; then
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
fi

if [ "${FULL_SIZE:-0}" = 1 ]; then
  cargo build --release >/dev/null 2>&1
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PYTHON" benches/peer/gpu_peer.py make "$work/models" assets/clip/bpe_simple_vocab_16e6.txt.gz --which sd15 >/dev/null 2>&1
  model="$work/models/sd15"
  lg=./target/release/loragate
  calls=${CALLS:-2}
  ours_unet=$("$lg" bench unet --model "$model" --device cpu --dtype f32 --size 512 --batch 1 --calls "$calls" 2>/dev/null)
  ours_img=$("$lg" bench txt2img --model "$model" --device cpu --dtype f32 --size 512 --steps 2 --guidance 7.5 --batches 1 --repeat 1 2>/dev/null)
  peer_unet=$("$PYTHON" benches/peer/gpu_peer.py unet "$model" --size 512 --batch 1 --calls "$calls" 2>/dev/null | tail -1)
  peer_img=$("$PYTHON" benches/peer/gpu_peer.py txt2img "$model" --size 512 --steps 2 --guidance 7.5 --batches 1 --repeat 1 2>/dev/null | tail -1)
  "$PYTHON" - "$ours_unet" "$ours_img" "$peer_unet" "$peer_img" <<'PY'
import json, sys
ou, oi, pu, pi = (json.loads(a) for a in sys.argv[1:])
def parts(unet, img):
    step = unet["ms_per_call"] / 1000
    return step, img["batches"][0]["seconds"] - 2 * step, img["load_s"]
o, p = parts(ou, oi), parts(pu, pi)
print()
print("| SD 1.5 architecture, random weights, 512x512, fp32 CPU | loragate | PyTorch + diffusers | loragate time / peer time |")
print("|---|---|---|---|")
for name, a, b in zip(("one guided step (UNet on 2 rows)", "rest of an image (text encoder, VAE decode)", "model load"), o, p):
    print(f"| {name} | {a:.2f} s | {b:.2f} s | {a / b:.2f} |")
PY
fi
