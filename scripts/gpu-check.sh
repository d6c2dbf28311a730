#!/usr/bin/env bash
# The GPU check: one prepared run on a GPU machine that has no Rust toolchain and no network
# (CUDA 13.0 under /usr/local/cuda, cuDNN 9, Python 3.12 with PyTorch, no diffusers). Prints
# one JSON document and exits non-zero on any mismatch. See README, "GPU".
#
#   scripts/gpu-check.sh pack DIR          # here: the CUDA binary (stripped) and the peer's
#                                          # wheels into DIR, at most 64 MiB
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
  mkdir -p "$pack/wheels"
  cp "$bin" "$pack/loragate"
  strip "$pack/loragate"
  # The peer's Python packages for the GPU machine's Python 3.12 (torch is already there).
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$pack/wheels" -r benches/peer/gpu-requirements.txt
  size=$(du -sm "$pack" | cut -f1)
  echo "packed $pack: $(du -sh "$pack/loragate" | cut -f1) binary, $(ls "$pack/wheels" | wc -l) wheels, ${size} MiB in all (limit ${LIMIT_MIB} MiB)"
  [ "$size" -le "$LIMIT_MIB" ] || { echo "over the ${LIMIT_MIB} MiB the GPU machine accepts" >&2; exit 1; }
  exit 0
fi
[ "$mode" = run ] || usage

device=cuda dtype=f16 big=1
if [ "${1:-}" = --cpu ]; then device=cpu dtype=f32 big=0; fi
work=$(mktemp -d "${TMPDIR:-/tmp}/loragate-gpu-check.XXXXXX")
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib64/stubs:${LD_LIBRARY_PATH:-}
lg=$pack/loragate
[ -x "$lg" ] || lg=${LORAGATE:-target/release/loragate}
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
python3 -m venv --system-site-packages "$work/venv"
if ls "$pack"/wheels/*.whl >/dev/null 2>&1; then
  "$work/venv/bin/pip" install -q --no-index --find-links "$pack/wheels" -r benches/peer/gpu-requirements.txt 2>"$work/pip.err" || true
fi
py=$work/venv/bin/python
peer_ok=$("$py" -c 'import torch, diffusers, transformers; print(1)' 2>/dev/null || echo 0)

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

if [ "$big" = 1 ] && [ "$peer_ok" = 1 ]; then
  step "random SD 1.5 and SDXL weights"
  run_json make "$py" benches/peer/gpu_peer.py make "$work/models" assets/clip/bpe_simple_vocab_16e6.txt.gz
  step "SD 1.5 512px txt2img: loragate, then diffusers"
  run_json sd15_loragate "$lg" bench txt2img --model "$work/models/sd15" --device cuda --dtype f16 --size 512 --steps 25 --guidance 7.5 --batches 1,8 --repeat 3
  run_json sd15_peer "$py" benches/peer/gpu_peer.py txt2img "$work/models/sd15" --size 512 --steps 25 --guidance 7.5 --batches 1,8 --repeat 3
  step "SDXL UNet 1024px: loragate, then diffusers"
  run_json sdxl_loragate "$lg" bench unet --model "$work/models/sdxl" --device cuda --dtype f16 --size 1024 --batch 2 --calls 10
  run_json sdxl_peer "$py" benches/peer/gpu_peer.py unet "$work/models/sdxl" --size 1024 --batch 2 --calls 10
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
# 3-4. full-size speed, both tools.
if big and not peer_ok:
    out["checks"]["full_size"] = {"skipped": "torch + diffusers are not importable (wheels missing?)"}
    bad.append("the peer environment could not be built")
elif big:
    s_ours, s_peer = load("sd15_loragate"), load("sd15_peer")
    x_ours, x_peer = load("sdxl_loragate"), load("sdxl_peer")
    full = {"sd15": {"loragate": s_ours, "peer": s_peer}, "sdxl_unet": {"loragate": x_ours, "peer": x_peer}}
    try:
        b = lambda r, n: next(x for x in r["batches"] if x["batch"] == n)
        full["sd15"]["ratio_seconds_per_image_batch1"] = b(s_ours, 1)["seconds_per_image"] / b(s_peer, 1)["seconds_per_image"]
        full["sd15"]["ratio_images_per_second_batch8"] = b(s_ours, 8)["images_per_second"] / b(s_peer, 8)["images_per_second"]
        full["sdxl_unet"]["ratio_ms_per_call"] = x_ours["ms_per_call"] / x_peer["ms_per_call"]
    except Exception as e:  # a failed step is reported above in its own entry
        bad.append(f"full-size benchmark incomplete: {e!r}")
    out["checks"]["full_size"] = full
else:
    out["checks"]["full_size"] = {"skipped": "the CPU half does not time full-size models"}
out["ok"] = not bad
print(json.dumps(out, indent=1))
sys.exit(0 if not bad else 1)
PY
