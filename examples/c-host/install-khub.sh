#!/usr/bin/env bash
# Installs khub's C API under PREFIX:
#
#   PREFIX/lib/libkhub.so  PREFIX/lib/libkhub.a  PREFIX/lib/pkgconfig/khub.pc
#   PREFIX/include/khub.h  PREFIX/include/khub_kernel.h
#
# usage: examples/c-host/install-khub.sh [--debug | --from DIR] [--link] PREFIX
#
#   (default)    cargo build --release --lib, then install from the release profile
#   --debug      cargo build --lib, then install from the debug profile
#   --from DIR   install the libkhub.so and libkhub.a already built in DIR (e.g.
#                target/debug after `cargo test`); runs no cargo command
#   --link       hard-link the libraries instead of copying them where the file system
#                allows (tests use it: a debug libkhub.a is hundreds of MB)
#
# KHUB_INSTALL_FROM=DIR and KHUB_INSTALL_LINK=1 in the environment act as --from DIR and
# --link (the documentation tests install the libraries their own run built that way).
# CARGO_TARGET_DIR is honoured. Then: PKG_CONFIG_PATH=PREFIX/lib/pkgconfig pkg-config
# --cflags --libs khub (see docs/c-api.md and examples/c-host/Makefile).
set -euo pipefail

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
profile=release
from=${KHUB_INSTALL_FROM:-}
link=${KHUB_INSTALL_LINK:-0}
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) profile=debug; shift ;;
    --release) profile=release; shift ;;
    --from) [ $# -ge 2 ] || usage; from=$2; shift 2 ;;
    --link) link=1; shift ;;
    -h|--help) usage ;;
    -*) echo "install-khub.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || usage
mkdir -p "$1"
prefix=$(cd "$1" && pwd)

if [ -z "$from" ]; then
  flags=(--lib)
  [ "$profile" = release ] && flags+=(--release)
  (cd "$root" && cargo build "${flags[@]}")
  from=${CARGO_TARGET_DIR:-$root/target}/$profile
fi
for f in libkhub.so libkhub.a; do
  [ -f "$from/$f" ] || { echo "install-khub.sh: $from/$f is missing; build with cargo build --lib first" >&2; exit 1; }
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -1)
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"

put() { # put SRC DEST MODE
  rm -f "$2"
  if [ "$link" = 1 ] && ln "$1" "$2" 2>/dev/null; then
    return
  fi
  install -m "$3" "$1" "$2"
}
put "$from/libkhub.so" "$prefix/lib/libkhub.so" 0755
put "$from/libkhub.a" "$prefix/lib/libkhub.a" 0644
install -m 0644 "$root/include/khub.h" "$root/include/khub_kernel.h" "$prefix/include/"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" "$root/include/khub.pc.in" >"$prefix/lib/pkgconfig/khub.pc"
chmod 0644 "$prefix/lib/pkgconfig/khub.pc"
echo "installed khub $version (C API) under $prefix; export PKG_CONFIG_PATH=$prefix/lib/pkgconfig"
