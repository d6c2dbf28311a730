#!/usr/bin/env bash
# Builds loragate with CUDA (feature `cuda`, or `cudnn` with CUDNN=1) on a machine that has no
# CUDA toolkit installed: nvcc 13.0, its headers and libraries come from PyPI into a virtual
# environment under target/. The binary links against libcuda's stub; at run time the GPU
# machine's driver provides libcuda, and CUDA 13.0 / cuDNN 9 under /usr/local/cuda provide the
# rest (put /usr/local/cuda/lib64 on LD_LIBRARY_PATH there).
#
#   scripts/build-cuda.sh            # → target/cuda/release/loragate with CUDA, for sm_90 (H100/H200)
#   CUDA_COMPUTE_CAP=89 scripts/build-cuda.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# A target folder of its own, so the CPU build (and its tests) stay as they are.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
VENV=${CUDA_VENV:-target/cuda-venv}
FEATURE=cuda
[ "${CUDNN:-0}" = 1 ] && FEATURE=cudnn
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q \
  "cuda-toolkit[nvcc,cublas,curand,nvrtc,cudart]==13.0.2" \
  "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.*"
[ "$FEATURE" = cudnn ] && "$VENV/bin/pip" install -q "nvidia-cudnn-cu13==9.*"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CUDA=$SITE/nvidia/cu13
[ -x "$CUDA/bin/nvcc" ] || { echo "nvcc not found under $CUDA" >&2; exit 3; }
# nvcc looks for cicc and libdevice under nvvm/ beside its own bin/.
[ -e "$CUDA/nvvm" ] || ln -s "$SITE/nvidia/cu13/nvvm" "$CUDA/nvvm" 2>/dev/null || true
# Link-time stand-ins, in a folder of their own:
# - the PyPI wheels ship only versioned libraries (libcudart.so.13): the linker wants libcudart.so;
# - libcuda comes with the GPU driver, not the toolkit: a stub with the soname libcuda.so.1 that
#   defines every driver function cudarc declares (no stub body ever runs: at run time the
#   driver's real libcuda.so.1 is loaded in its place).
mkdir -p "$CARGO_TARGET_DIR/link-stubs"
STUBS=$(cd "$CARGO_TARGET_DIR/link-stubs" && pwd)
# cuDNN's wheel has a folder of its own (nvidia/cudnn/lib).
for lib in "$CUDA"/lib/lib*.so.* "$SITE"/nvidia/cudnn/lib/lib*.so.*; do
  [ -e "$lib" ] || continue
  base=$(basename "$lib")
  ln -sf "$lib" "$STUBS/${base%%.so.*}.so"
done
if [ ! -e "$STUBS/libcuda.so" ]; then
  cargo fetch --locked >/dev/null
  version=$(awk '/^name = "cudarc"$/ {getline; gsub(/"/, "", $3); print $3; exit}' Cargo.lock)
  sys=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$version"/src/driver/sys/mod.rs | head -n 1)
  grep -ohE '^\s+fn cu[A-Z][A-Za-z0-9_]*\(' "$sys" | sed -E 's/^\s+fn (\w+)\(/void \1(void) {}/' | sort -u > "$STUBS/libcuda-stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUBS/libcuda.so" "$STUBS/libcuda-stub.c"
fi
export PATH=$CUDA/bin:$PATH
export CUDA_ROOT=$CUDA CUDA_PATH=$CUDA CUDA_TOOLKIT_ROOT_DIR=$CUDA
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export NVCC_PREPEND_FLAGS="-I$CUDA/include -I$CUDA/include/cccl ${NVCC_PREPEND_FLAGS:-}"
export LIBRARY_PATH=$STUBS:$CUDA/lib:${LIBRARY_PATH:-}
export LD_LIBRARY_PATH=$CUDA/lib:$SITE/nvidia/cudnn/lib:${LD_LIBRARY_PATH:-}
cargo build --release --features "$FEATURE"
echo "built $CARGO_TARGET_DIR/release/loragate with $FEATURE for sm_$CUDA_COMPUTE_CAP"
