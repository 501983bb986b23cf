#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (issue 14): builds khub and the CUDA variant
# of kernels-example, then runs `khub host`, `explain`, `load`, `selftest` and `bench` on
# the GPU, and, when PyTorch with CUDA is installed, compares `silu_and_mul` with torch's
# own op (throughput and the largest difference). Prints one table at the end.
#
# Usage: scripts/gpu-check.sh [--no-build]
#   --no-build   use target/release/khub and target/release/libkhub.so as they are
# Environment: KHUB_NVCC (or nvcc on PATH, or $CUDA_HOME/bin/nvcc), PYTHON (default python3),
#   CARGO_TARGET_DIR (default target).
#
# Exit status: 0 when every step passed; 1 when a step failed; 2 when this machine has no
# usable NVIDIA GPU or no nvcc (nothing was run; the message says what is missing).
# Without a GPU it stops at the first check, so it is safe to run anywhere; the test
# tests/gpu_check_script.rs runs it in that mode.
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

no_gpu() {
  echo "gpu-check: no usable NVIDIA GPU: $1" >&2
  echo "gpu-check: nothing was run; run this on a machine with an NVIDIA GPU and driver" >&2
  exit 2
}

# 1. A GPU and its driver, before anything is built.
command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi is not on PATH (no driver installed?)"
gpus=$(nvidia-smi --query-gpu=index,name,compute_cap,driver_version --format=csv,noheader 2>/dev/null) \
  || no_gpu "nvidia-smi failed: $(nvidia-smi 2>&1 | head -1)"
[ -n "$gpus" ] || no_gpu "nvidia-smi lists no GPU"
echo "== GPUs (index, name, compute capability, driver)"
echo "$gpus"

# 2. nvcc, as khub package finds it.
nvcc="${KHUB_NVCC:-}"
[ -n "$nvcc" ] || nvcc=$(command -v nvcc || true)
[ -n "$nvcc" ] || { [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && nvcc="$CUDA_HOME/bin/nvcc"; } || true
[ -n "$nvcc" ] && [ -x "$nvcc" ] || {
  echo "gpu-check: no nvcc: set KHUB_NVCC, put nvcc on PATH or set CUDA_HOME (pip install nvidia-cuda-nvcc works)" >&2
  exit 2
}
export KHUB_NVCC="$nvcc"
echo "== nvcc: $nvcc ($("$nvcc" --version | tail -1))"

target="${CARGO_TARGET_DIR:-target}"
if [ "$build" = 1 ]; then
  echo "== cargo build --release (khub and libkhub.so)"
  cargo build --release
fi
khub="$target/release/khub"
libkhub="$target/release/libkhub.so"
[ -x "$khub" ] || { echo "gpu-check: $khub is missing (build without --no-build)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/khub-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
registry="$work/registry"
release="$registry/acme/activation/0.1.0"
mkdir -p "$(dirname "$release")"
common=(--registry "$registry" --cache "$work/cache")
export HOME="$work/home"   # no user trust policy or rollback state leaks in
mkdir -p "$HOME"

rows=()
failed=0
# step NAME COMMAND...: runs it, records ok/FAILED and the wall time in milliseconds.
step() {
  local name="$1"; shift
  local t0 t1 status=ok
  t0=$(date +%s%N)
  echo "== $name: $*"
  if ! "$@" > "$work/$name.out" 2> "$work/$name.err"; then status=FAILED; failed=1; fi
  t1=$(date +%s%N)
  sed 's/^/   /' "$work/$name.out" | head -40
  [ "$status" = ok ] || sed 's/^/   stderr: /' "$work/$name.err" | tail -20
  rows+=("$name|$status|$(( (t1 - t0) / 1000000 )) ms|")
}

# 3. The CUDA variant (strict: a missing toolchain is an error, not a skip).
step package "$khub" package kernels-example --out "$release" --strict
grep -q 'backend = "cuda"' "$release/khub.toml" 2>/dev/null || { echo "gpu-check: the release has no CUDA variant" >&2; failed=1; }

# 4. The commands, on the GPU.
step host "$khub" host
step explain "$khub" explain "$release"
step load "$khub" load acme/activation "${common[@]}" --prefer backend=cuda --json
step selftest "$khub" selftest acme/activation "${common[@]}" --prefer backend=cuda --json
step bench "$khub" bench acme/activation silu_and_mul "${common[@]}" --prefer backend=cuda --json
variant=$(grep -o '"variant": *"[^"]*"' "$work/load.out" | head -1 | sed 's/.*"\([^"]*\)"$/\1/' || true)
case "$variant" in
  cuda-*) ;;
  *) echo "gpu-check: the loaded variant is '${variant:-none}', not a CUDA one" >&2; failed=1 ;;
esac
rows+=("loaded variant|${variant:-none}||")

# 5. silu_and_mul against torch, through the C API (libkhub.so), on the same tensors.
python="${PYTHON:-python3}"
if "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  if "$python" scripts/gpu_check_torch.py "$libkhub" "$registry" "$work/cache" > "$work/torch.out" 2> "$work/torch.err"; then
    cat "$work/torch.out"
    while IFS= read -r line; do rows+=("$line"); done < <(grep '^row|' "$work/torch.out" | cut -d'|' -f2-)
  else
    failed=1
    sed 's/^/   stderr: /' "$work/torch.err" | tail -20
    rows+=("torch comparison|FAILED||")
  fi
else
  rows+=("torch comparison|skipped|PyTorch with CUDA is not installed for $python|")
fi

echo
echo "| step | result | time / figure |"
echo "|---|---|---|"
for r in "${rows[@]}"; do
  IFS='|' read -r a b c _ <<< "$r"
  echo "| $a | $b | $c |"
done
exit "$failed"
