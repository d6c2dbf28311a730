#!/usr/bin/env bash
# The GPU check: one prepared run on a GPU machine that has no Rust toolchain and no network
# (CUDA 13.0 under /usr/local/cuda, cuDNN 9, Python 3.12 with PyTorch, no diffusers). Prints
# one JSON document and exits non-zero on any mismatch. See docs/gpu.md.
#
#   scripts/gpu-check.sh pack DIR          # here: the CUDA binary (stripped, xz) and the peer's
#                                          # Python packages into DIR (about 10 MiB)
#   scripts/gpu-check.sh run DIR           # there, from the repository root: about 8 minutes
#   scripts/gpu-check.sh run DIR --cpu     # the same steps on the CPU (f32), to prove the script
#
# What it measures (`run`):
#   1. tiny-sd on the device in f32 against the PyTorch fixtures, and in f16 against f32;
#   2. suites/portrait.yaml in f16 on the device, with its verdicts (cuda-f16 baselines are new:
#      nothing is written, they are review items);
#   3. SD 1.5's architecture with random weights, 512x512, 25 DDIM steps, guidance 7.5, f16:
#      seconds per image at batch 1, images per second at batch 8 — loragate and PyTorch +
#      diffusers on the same weights, in the same run;
#   4. SDXL base's UNet at 1024x1024, milliseconds per call at batch 2 (4 rows with guidance),
#      both tools.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MIB=64

usage() { sed -n '2,20p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
mode=$1 pack=$2
shift 2

if [ "$mode" = pack ]; then
  bin=${CUDA_BINARY:-target/cuda/release/loragate}
  [ -x "$bin" ] || { echo "no CUDA binary at $bin: run CUDNN=1 scripts/build-cuda.sh first" >&2; exit 3; }
  rm -rf "$pack" && mkdir -p "$pack"
  tmp=$(mktemp -d)
  cp "$bin" "$tmp/loragate" && strip "$tmp/loragate"
  xz -9 -T2 -c "$tmp/loragate" >"$pack/loragate.xz"
  # The peer's Python packages that the GPU machine lacks (it has PyTorch, transformers, numpy,
  # Pillow...: see .library/device/KINDS.md), downloaded with pip for its Python 3.12, unpacked
  # and xz-compressed: a wheel's own zip compression would not fit beside the repository in the
  # 64 MiB the device tool sends.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$tmp/wheels" -r benches/peer/gpu-requirements.txt
  mkdir -p "$tmp/site"
  for w in "$tmp"/wheels/*.whl; do (cd "$tmp/site" && python3 -m zipfile -e "$w" .); done
  tar -cf - -C "$tmp/site" . | xz -9 -T2 >"$pack/peer-site.tar.xz"
  cp benches/peer/gpu-requirements.txt "$pack/"
  rm -rf "$tmp"
  size=$(du -sb "$pack" | cut -f1)
  repo=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  printf 'packed %s: %s (%.1f MiB); with the repository %.1f MiB of the %s MiB a device call sends\n' "$pack" "$(ls "$pack" | tr '\n' ' ')" \
    "$(echo "$size / 1048576" | bc -l)" "$(echo "($size + $repo) / 1048576" | bc -l)" "$LIMIT_MIB"
  [ $((size + repo)) -le $((LIMIT_MIB * 1048576)) ] || { echo "over the ${LIMIT_MIB} MiB a device call sends" >&2; exit 1; }
  exit 0
fi
[ "$mode" = run ] || usage

device=cuda dtype=f16 big=1
# The CPU half: every step on the CPU in f32 with the CPU build; SD 1.5 at 64 px and 2 steps
# when PyTorch + diffusers are importable (PYTHON=...), the SDXL UNet skipped.
if [ "${1:-}" = --cpu ]; then device=cpu dtype=f32 big=0; fi
work=$(mktemp -d "${TMPDIR:-/tmp}/loragate-gpu-check.XXXXXX")
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib64/stubs:${LD_LIBRARY_PATH:-}
if [ -f "$pack/loragate.xz" ] && [ "$device" = cuda ]; then
  xz -d -c "$pack/loragate.xz" >"$work/loragate" && chmod +x "$work/loragate"
  lg=$work/loragate
else
  # The CPU half, here: the CPU build.
  lg=${LORAGATE:-target/release/loragate}
fi
step() { echo "== $*" >&2; }
# Each step writes its JSON to a file; a step that fails leaves {"error": ...} instead.
run_json() {
  local name=$1; shift
  if out=$(timeout "${STEP_TIMEOUT:-240}" "$@" 2>"$work/$name.err"); then
    printf '%s' "$out" >"$work/$name.json"
  else
    local code=$?
    python3 -c 'import json,sys; print(json.dumps({"error": "exit %s" % sys.argv[1], "stderr": open(sys.argv[2]).read()[-2000:]}))' "$code" "$work/$name.err" >"$work/$name.json"
  fi
}

step "peer environment"
py=${PYTHON:-python3}
if [ -f "$pack/peer-site.tar.xz" ]; then
  mkdir -p "$work/site" && tar -xJf "$pack/peer-site.tar.xz" -C "$work/site"
  export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "tiny-sd parity on $device"
run_json parity_f32 "$lg" bench parity --device "$device" --dtype f32
if [ "$device" = cuda ]; then
  run_json parity_f16 "$lg" bench parity --device cuda --dtype f16
fi

step "portrait suite on $device ($dtype)"
set +e
timeout "${STEP_TIMEOUT:-240}" "$lg" suite suites/portrait.yaml --device "$device" --dtype "$dtype" --update-baselines never \
  --out "$work/portrait" --cache-dir "$work/cache" >"$work/portrait.log" 2>&1
echo $? >"$work/portrait.code"
set -e

peer_ok=$("$py" -c 'import torch, diffusers, transformers; print(1)' 2>/dev/null || echo 0)
if [ "$peer_ok" = 1 ]; then
  if [ "$big" = 1 ]; then
    size=512 steps=25 batches=1,8 repeat=3 which=sd15,sdxl
  else
    size=64 steps=2 batches=1,2 repeat=1 which=sd15
  fi
  step "random weights ($which)"
  run_json make "$py" benches/peer/gpu_peer.py make "$work/models" assets/clip/bpe_simple_vocab_16e6.txt.gz --which "$which"
  step "SD 1.5 ${size}px txt2img: loragate, then diffusers"
  run_json sd15_loragate "$lg" bench txt2img --model "$work/models/sd15" --device "$device" --dtype "$dtype" --size "$size" --steps "$steps" --guidance 7.5 --batches "$batches" --repeat "$repeat"
  run_json sd15_peer "$py" benches/peer/gpu_peer.py txt2img "$work/models/sd15" --size "$size" --steps "$steps" --guidance 7.5 --batches "$batches" --repeat "$repeat"
  if [ "$big" = 1 ]; then
    step "SDXL UNet 1024px: loragate, then diffusers"
    run_json sdxl_loragate "$lg" bench unet --model "$work/models/sdxl" --device cuda --dtype f16 --size 1024 --batch 2 --calls 10
    run_json sdxl_peer "$py" benches/peer/gpu_peer.py unet "$work/models/sdxl" --size 1024 --batch 2 --calls 10
  fi
fi

python3 - "$work" "$device" "$dtype" "$big" "$peer_ok" <<'PY'
import json, os, re, sys
work, device, dtype, big, peer_ok = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5] == "1"
def load(name):
    p = os.path.join(work, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None
out = {"device": device, "dtype": dtype, "checks": {}, "mismatches": []}
bad = out["mismatches"]
# 1. parity: the whole 20-step pipeline within 2/255 of PyTorch in f32; f16 within 1.5/255 on average of f32.
p32 = load("parity_f32")
out["checks"]["tiny_sd_f32_vs_pytorch"] = p32
if not p32 or "error" in p32:
    bad.append("tiny-sd f32 parity did not run")
else:
    pipe = p32["against_pytorch_f32"]["pipeline"]
    if not (pipe["max"] <= 2 / 255 and pipe["mean"] <= 0.1 / 255):
        bad.append(f"tiny-sd f32 pipeline differs from PyTorch: max {pipe['max'] * 255:.3f}/255, mean {pipe['mean'] * 255:.4f}/255")
p16 = load("parity_f16")
if p16 is not None:
    out["checks"]["tiny_sd_f16_vs_f32"] = p16
    if "error" in p16:
        bad.append("tiny-sd f16 did not run")
    else:
        d = p16["against_f32_same_device"]["pipeline"]
        if not (d["mean"] <= 1.5 / 255 and d["max"] == d["max"]):
            bad.append(f"tiny-sd f16 pipeline differs from f32: mean {d['mean'] * 255:.3f}/255")
# 2. the portrait suite: its verdicts, from the JUnit file.
code = int(open(os.path.join(work, "portrait.code")).read().strip() or 99)
junit = os.path.join(work, "portrait", "junit.xml")
verdicts = {"exit": code}
if os.path.exists(junit):
    x = open(junit).read()
    head = re.search(r"<testsuites[^>]*>", x).group(0)
    for k in ("tests", "skipped", "failures", "errors"):
        m = re.search(k + r'="(\d+)"', head)
        verdicts[k] = int(m.group(1)) if m else None
    verdicts["failed_checks"] = [f"{c}::{n}" for n, c in re.findall(r'<testcase name="([^"]+)" classname="([^"]+)"[^>]*>\s*<failure', x)]
verdicts["log_tail"] = open(os.path.join(work, "portrait.log")).read()[-1500:]
out["checks"]["portrait"] = verdicts
if code != 0:
    bad.append(f"the portrait suite exited {code} on {device} {dtype}")
# 3-4. full-size speed, both tools (in the CPU half: SD 1.5 at 64 px, to prove the steps run).
if not peer_ok:
    out["checks"]["full_size"] = {"skipped": "torch + diffusers are not importable"}
    if big:
        bad.append("the peer environment could not be built")
else:
    s_ours, s_peer = load("sd15_loragate"), load("sd15_peer")
    full = {"make": load("make"), "sd15": {"loragate": s_ours, "peer": s_peer}}
    try:
        b = lambda r, n: next(x for x in r["batches"] if x["batch"] == n)
        first, last = sorted(x["batch"] for x in s_ours["batches"])[0], sorted(x["batch"] for x in s_ours["batches"])[-1]
        full["sd15"][f"ratio_seconds_per_image_batch{first}"] = b(s_ours, first)["seconds_per_image"] / b(s_peer, first)["seconds_per_image"]
        full["sd15"][f"ratio_images_per_second_batch{last}"] = b(s_ours, last)["images_per_second"] / b(s_peer, last)["images_per_second"]
        if big:
            x_ours, x_peer = load("sdxl_loragate"), load("sdxl_peer")
            full["sdxl_unet"] = {"loragate": x_ours, "peer": x_peer, "ratio_ms_per_call": x_ours["ms_per_call"] / x_peer["ms_per_call"]}
    except Exception as e:  # a failed step is reported in its own entry
        bad.append(f"full-size benchmark incomplete: {e!r}")
    out["checks"]["full_size"] = full
out["ok"] = not bad
print(json.dumps(out, indent=1))
sys.exit(0 if not bad else 1)
PY
