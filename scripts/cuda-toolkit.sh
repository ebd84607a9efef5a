#!/usr/bin/env bash
# A CUDA 13.0 build toolkit from NVIDIA's PyPI wheels, for building `--features cuda` on a machine without a GPU
# or a system CUDA. Prints the environment a build needs (`eval "$(scripts/cuda-toolkit.sh DIR)"`).
#
# Why each piece:
# - nvidia-cuda-nvcc (13.0.x: bin/nvcc, cudafe++, ptxas, fatbinary) + nvidia-nvvm (cicc) + nvidia-cuda-crt (the
#   crt/ headers nvcc includes) + nvidia-cuda-cccl (cuda/std, cub, thrust): candle-kernels compiles its .cu files
#   with nvcc. 13.0.x, not newer: PTX from a newer toolkit does not JIT on the 13.0 driver of the GPU machine.
# - nvidia-cuda-runtime (headers, libcudart), nvidia-cublas, nvidia-curand, nvidia-cuda-nvrtc: candle links cudarc
#   with `dynamic-linking`, so the linker needs libcudart, libcublas, libcublasLt, libcurand and libnvrtc. The
#   wheels ship only the versioned names (libcublas.so.13): `stubs/` gets the unversioned links.
# - libcuda.so: the driver library is not in any wheel (it comes with the driver). `stubs/libcuda.so` is a stub
#   generated here that defines every `cu*` function cudarc's driver bindings call, with the real soname
#   `libcuda.so.1`, so the binary loads the machine's real driver at run time. The stub is never run.
set -euo pipefail
dir=${1:-.cuda}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
site=$dir/site
root=$site/nvidia/cu13
stamp=$dir/installed-13.0.88
if [ ! -f "$stamp" ]; then
  python3 -m pip install --quiet --no-deps --only-binary=:all: --target "$site" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 \
    nvidia-cuda-runtime==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 >&2
  touch "$stamp"
fi
stubs=$dir/stubs
mkdir -p "$stubs"
for lib in cudart cublas cublasLt curand nvrtc; do
  real=$(ls "$root"/lib/lib$lib.so.* 2>/dev/null | grep -v -e builtins -e '\.alt\.' | head -1)
  [ -n "$real" ] || { echo "cuda-toolkit: lib$lib.so.* missing under $root/lib" >&2; exit 1; }
  ln -sf "$real" "$stubs/lib$lib.so"
done
if [ ! -f "$stubs/libcuda.so" ]; then
  cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | head -1)
  [ -n "$cudarc" ] || { echo "cuda-toolkit: cudarc sources not found (run cargo fetch first)" >&2; exit 1; }
  grep -ohE '^pub unsafe fn cu[A-Za-z0-9_]+' "$cudarc"/src/driver/sys/*.rs | sed 's/pub unsafe fn //' | sort -u |
    sed 's/.*/int &(void) { return 999; }/' > "$stubs/libcuda-stub.c"
  cc -shared -fPIC -o "$stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$stubs/libcuda-stub.c"
fi
echo "export CUDA_HOME=$root"
echo "export PATH=$root/bin:\$PATH"
echo "export LIBRARY_PATH=$stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
echo "export CUDARC_CUDA_VERSION=13000"
# compute_80 PTX JITs on the RTX 3090 (sm_86) and the H200 (sm_90); the prebuilt MoE/MMQ kernels get sm_80 SASS.
echo "export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-80}"
