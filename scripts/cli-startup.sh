#!/usr/bin/env bash
# Whole-process start-up (issue 14): `khub load acme/activation --locked --offline` from a
# warm store against `khub --version` (the process floor) and the Python floor
# (`hf_hub_download(local_files_only=True)` + sha256 + ctypes.CDLL of the same library),
# measured in one run, interleaved round by round. Prints medians and the two ratios.
#
# Usage: scripts/cli-startup.sh [ROUNDS]     (default 40; the Python arm runs every 4th round)
# Environment: KHUB (default target/release/khub), PYTHON (default python3, needs
#   huggingface_hub; the Python arm is skipped, saying so, without it).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-40}"
khub="${KHUB:-${CARGO_TARGET_DIR:-target}/release/khub}"
python="${PYTHON:-python3}"
[ -x "$khub" ] || { echo "cli-startup: $khub is missing: cargo build --release, or set KHUB" >&2; exit 2; }
khub=$(realpath "$khub")

work=$(mktemp -d "${TMPDIR:-/tmp}/khub-cli-startup.XXXXXX")
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
export HOME="$work/home"; mkdir -p "$HOME"
for v in KHUB_CACHE KHUB_REGISTRY KHUB_OFFLINE HF_HUB_OFFLINE KHUB_HOST_PROFILE KHUB_TRUST_POLICY; do unset "$v"; done

# A registry with the example kernel (CPU variants), a lock for this host, a warm store.
reg="$work/registry"
"$khub" package kernels-example --out "$reg/acme/activation/0.1.0" > /dev/null 2>&1
printf '[kernels]\n"acme/activation" = "^0.1"\n' > "$work/kernels.toml"
"$khub" lock --app "$work/kernels.toml" --out "$work/khub.lock" --registry "$reg" --cache "$work/cache" > /dev/null
load=("$khub" load acme/activation --locked --lock "$work/khub.lock" --offline --cache "$work/cache")
"${load[@]}" > /dev/null   # warm: store filled, host facts cached for this boot
lib=$(grep -o 'variants/[^"]*\.so' "$work/khub.lock" | head -1)

# The Python floor reads the same library from a huggingface_hub cache, filled once from
# `khub serve` over the same registry.
have_python=0
if "$python" -c 'import huggingface_hub' 2>/dev/null; then
  port=$(( 20000 + RANDOM % 20000 ))
  "$khub" serve "$reg" --addr "127.0.0.1:$port" 2> "$work/serve.log" &
  server=$!
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/api/models/acme/activation" > /dev/null 2>&1 && break; sleep 0.1; done
  export HF_HOME="$work/hf" HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_XET=1 NO_PROXY=127.0.0.1
  HF_ENDPOINT="http://127.0.0.1:$port" "$python" -c "
import sys; from huggingface_hub import hf_hub_download
hf_hub_download('acme/activation', sys.argv[1], revision='v0.1.0')" "$lib"
  kill "$server"; server=""
  cat > "$work/floor.py" <<'PY'
import ctypes, hashlib, sys
from huggingface_hub import hf_hub_download
path = hf_hub_download("acme/activation", sys.argv[1], revision="v0.1.0", local_files_only=True)
with open(path, "rb") as f:
    hashlib.sha256(f.read()).hexdigest()
ctypes.CDLL(path)
PY
  HF_HUB_OFFLINE=1 "$python" "$work/floor.py" "$lib"
  have_python=1
else
  echo "cli-startup: skipped the Python floor: '$python -c \"import huggingface_hub\"' failed"
fi

# Timed with bash's own clock ($EPOCHREALTIME, microseconds): no process is started inside
# the timed window but the one measured. (Timing with `$(date +%s%N)` would put the start
# of a `date` process, about 1 ms here, into every measurement.)
us() { local s=${1//[.,]/}; echo $(( 10#${s} )); }   # the decimal mark is the locale's
ms() { local t0 t1; t0=$EPOCHREALTIME; "$@" > /dev/null 2>&1; t1=$EPOCHREALTIME; echo $(( $(us "$t1") - $(us "$t0") )); }
: > "$work/version.us"; : > "$work/load.us"; : > "$work/python.us"
for i in $(seq "$rounds"); do
  if (( i % 2 )); then
    ms "$khub" --version >> "$work/version.us"; ms "${load[@]}" >> "$work/load.us"
  else
    ms "${load[@]}" >> "$work/load.us"; ms "$khub" --version >> "$work/version.us"
  fi
  if (( have_python && i % 4 == 0 )); then
    HF_HUB_OFFLINE=1 ms "$python" "$work/floor.py" "$lib" >> "$work/python.us"
  fi
done
median() { sort -n "$1" | awk '{a[NR]=$1} END {if (NR) printf "%.2f", a[int((NR+1)/2)]/1000; else printf "nan"}'; }
v=$(median "$work/version.us"); l=$(median "$work/load.us"); p=$(median "$work/python.us")
echo "rounds: $rounds (python: every 4th); medians of whole-process wall time, ms"
printf '%-62s %10s\n' "khub --version" "$v"
printf '%-62s %10s\n' "khub load acme/activation --locked --offline (warm)" "$l"
[ "$have_python" = 1 ] && printf '%-62s %10s\n' "python: hf_hub_download(local_files_only) + sha256 + ctypes" "$p"
awk -v l="$l" -v v="$v" 'BEGIN {r = l / v; printf "load / --version: %.2f; goal <= 2: %s\n", r, (r <= 2 ? "met" : "NOT met")}'
[ "$have_python" = 1 ] && awk -v l="$l" -v p="$p" 'BEGIN {r = p / l; printf "python floor / load: %.1f; goal >= 80: %s\n", r, (r >= 80 ? "met" : "NOT met")}'
exit 0
