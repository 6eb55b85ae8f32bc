#!/usr/bin/env bash
# What the build and the tests need from the system, and which Debian packages bring what is
# missing. Each probe looks for the very file its consumer loads, so a look-alike cannot fool it
# (libclang-cpp.so.14 is not libclang: clang-sys skips every "-cpp." file).
#
#   scripts/ci_deps.sh             the Debian packages to install, one a line (none: prints nothing)
#   scripts/ci_deps.sh --explain   each probe: what it looks for, and what it found
#   scripts/ci_deps.sh --self-test the probes against fake system trees (exits non-zero on a miss)
#
# ROOT=DIR makes every probe look under DIR instead of / (the self-test uses it); commands are
# then looked for in DIR/usr/local/bin, DIR/usr/bin and DIR/bin only.
set -euo pipefail
shopt -s nullglob
ROOT="${ROOT:-}"

has_cmd() {
  if [ -z "$ROOT" ]; then
    command -v "$1" >/dev/null
  else
    local d
    for d in usr/local/bin usr/bin bin; do [ -x "$ROOT/$d/$1" ] && return 0; done
    return 1
  fi
}

# clang-sys (bindgen's `runtime` feature, used by mpi-sys) loads the newest file named
# libclang.so, libclang-*.so, libclang.so.* or libclang-*.so.* — but never one containing "-cpp." —
# from $LIBCLANG_PATH or these directories (clang-sys 1.9 build/common.rs, DIRECTORIES_LINUX).
libclang_found() {
  local dirs=() d f name
  [ -n "${LIBCLANG_PATH:-}" ] && dirs+=("$ROOT$LIBCLANG_PATH")
  for d in "$ROOT"/usr/local/llvm*/lib* "$ROOT"/usr/local/lib*/*/* "$ROOT"/usr/local/lib*/* \
    "$ROOT"/usr/local/lib* "$ROOT"/usr/lib*/*/* "$ROOT"/usr/lib*/* "$ROOT"/usr/lib*; do
    [ -d "$d" ] && dirs+=("$d")
  done
  for d in "${dirs[@]}"; do
    for f in "$d"/libclang.so "$d"/libclang-*.so "$d"/libclang.so.* "$d"/libclang-*.so.*; do
      [ -e "$f" ] || continue
      name=${f##*/}
      case "$name" in *-cpp.*) continue ;; esac
      echo "$f"
      return 0
    done
  done
  return 1
}

# bindgen parses mpi.h, which includes <stddef.h>: that comes from clang's own resource directory
# (libclang-common-N-dev), not from libc.
clang_headers_found() {
  local f
  for f in "$ROOT"/usr/lib/llvm-*/lib/clang/*/include/stddef.h \
    "$ROOT"/usr/local/lib/clang/*/include/stddef.h "$ROOT"/usr/lib/clang/*/include/stddef.h; do
    echo "$f"
    return 0
  done
  return 1
}

# Each probe: name, what it looks for, the packages that bring it.
# Mode: explain (a line each), packages (what to install for the missing), names (the missing).
probe() {
  local mode=$1 name=$2 want=$3 pkgs=$4 found=$5
  case "$mode" in
    explain)
      if [ -n "$found" ]; then
        printf '%-14s %-56s found: %s\n' "$name" "$want" "$found"
      else
        printf '%-14s %-56s MISSING -> apt-get install %s\n' "$name" "$want" "$pkgs"
      fi
      ;;
    packages) [ -n "$found" ] || tr ' ' '\n' <<<"$pkgs" ;;
    names) [ -n "$found" ] || echo "$name" ;;
  esac
}

run_probes() {
  local mode=$1 cmd found
  # mimalloc's and mpi-sys' build scripts compile C.
  found=""
  has_cmd cc && found=cc
  probe "$mode" "c-compiler" "cc on PATH" "build-essential" "$found"
  # mpi-sys asks `mpicc -show` how to build against MPI; the mpirun tests launch `mpirun -n 2`.
  for cmd in mpicc mpirun; do
    found=""
    has_cmd $cmd && found=$cmd
    probe "$mode" "$cmd" "$cmd on PATH" "openmpi-bin libopenmpi-dev" "$found"
  done
  probe "$mode" "libclang" "libclang{,-N}.so[.N] (not libclang-cpp) for bindgen" \
    "libclang-dev" "$(libclang_found || true)"
  probe "$mode" "clang-headers" "clang's stddef.h (lib/clang/*/include)" \
    "libclang-dev" "$(clang_headers_found || true)"
}

missing() { run_probes packages | awk '!seen[$0]++'; }

self_test() {
  local tmp fails=0
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  # expect CASE MISSING_PROBES PACKAGES: over $tmp/CASE exactly these probes miss, and exactly
  # these packages are asked for.
  expect() {
    local names pkgs
    names=$(ROOT="$tmp/$1" LIBCLANG_PATH='' run_probes names | tr '\n' ' ')
    pkgs=$(ROOT="$tmp/$1" LIBCLANG_PATH='' missing | sort | tr '\n' ' ')
    local want
    want=$(tr ' ' '\n' <<<"$3" | sed '/^$/d' | sort | tr '\n' ' ')
    if [ "$names" = "$2${2:+ }" ] && [ "$pkgs" = "$want" ]; then
      echo "self-test $1: ok (missing: ${names:-none}; install: ${pkgs:-nothing})"
    else
      echo "self-test $1: FAILED: missing [$names] install [$pkgs]; expected [$2] [$want]" >&2
      fails=$((fails + 1))
    fi
  }
  mk() { mkdir -p "$(dirname "$1")" && : >"$1" && chmod +x "$1"; }
  # A bare machine of this kind: gcc, and libclang-cpp from the LLVM 14 runtime but no libclang.
  for c in bare complete runtime-only no-headers cpp-only; do
    mk "$tmp/$c/usr/bin/cc"
    mk "$tmp/$c/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14"
    mk "$tmp/$c/usr/lib/llvm-14/lib/libclang-cpp.so.14"
  done
  expect bare "mpicc mpirun libclang clang-headers" "openmpi-bin libopenmpi-dev libclang-dev"
  # After `apt-get install openmpi-bin libopenmpi-dev libclang-dev`.
  mk "$tmp/complete/usr/bin/mpicc"
  mk "$tmp/complete/usr/bin/mpirun"
  mk "$tmp/complete/usr/lib/llvm-14/lib/libclang.so"
  mk "$tmp/complete/usr/lib/x86_64-linux-gnu/libclang-14.so.1"
  mk "$tmp/complete/usr/lib/llvm-14/lib/clang/14.0.6/include/stddef.h"
  expect complete "" ""
  # libclang1-14 and libclang-common-14-dev alone: the versioned library is enough at run time.
  mk "$tmp/runtime-only/usr/bin/mpicc"
  mk "$tmp/runtime-only/usr/bin/mpirun"
  mk "$tmp/runtime-only/usr/lib/x86_64-linux-gnu/libclang-14.so.1"
  mk "$tmp/runtime-only/usr/lib/llvm-14/lib/clang/14.0.6/include/stddef.h"
  expect runtime-only "" ""
  # A library without clang's headers: bindgen would fail on <stddef.h>.
  mk "$tmp/no-headers/usr/bin/mpicc"
  mk "$tmp/no-headers/usr/bin/mpirun"
  mk "$tmp/no-headers/usr/lib/llvm-14/lib/libclang.so.1"
  expect no-headers "clang-headers" "libclang-dev"
  # The issue's machine with clang's headers: libclang-cpp alone must still count as missing.
  mk "$tmp/cpp-only/usr/bin/mpicc"
  mk "$tmp/cpp-only/usr/bin/mpirun"
  mk "$tmp/cpp-only/usr/lib/llvm-14/lib/clang/14.0.6/include/stddef.h"
  expect cpp-only "libclang" "libclang-dev"
  # No compiler at all.
  mkdir -p "$tmp/empty"
  expect empty "c-compiler mpicc mpirun libclang clang-headers" "build-essential openmpi-bin libopenmpi-dev libclang-dev"
  [ $fails = 0 ]
}

case "${1:-}" in
  "") missing ;;
  --explain) run_probes explain ;;
  --self-test) self_test ;;
  *)
    echo "usage: $0 [--explain | --self-test]" >&2
    exit 2
    ;;
esac
