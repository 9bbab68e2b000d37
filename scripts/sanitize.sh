#!/usr/bin/env bash
# Build ksae's C++ core with AddressSanitizer + UndefinedBehaviorSanitizer (GCC) in a throwaway
# virtual environment and run the tests against that build: first the kernel tests
# (tests/test_kernels.py, tests/test_gradients.py), then the rest of the suite. Exits non-zero
# on any failing test or any sanitizer report.
#
# Usage: scripts/sanitize.sh [--kernels-only] [extra pytest arguments, e.g. -k decode -x]
# Environment:
#   KSAE_SANITIZE_OPT   optimisation level of the sanitized build (default -O1; -O0 gives exact
#                       stacks, and its tests run 2-4x slower: on 2 cores the whole script took
#                       85 s at -O1, 106 s at -O0). The CMake build type is Debug either way, so
#                       NDEBUG is unset and Eigen's assertions stay on.
#   KSAE_SANITIZE_KEEP=1  keep the temporary directory (venv, build tree, logs).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

kernels_only=0
if [[ "${1:-}" == "--kernels-only" ]]; then
  kernels_only=1
  shift
fi
opt=${KSAE_SANITIZE_OPT:--O1}

# GCC only: the runtimes preloaded below must be the ones the extension was linked against.
export CC=gcc CXX=g++
command -v "$CXX" >/dev/null || { echo "sanitize.sh: $CXX not found" >&2; exit 2; }
libasan=$("$CXX" -print-file-name=libasan.so)
libubsan=$("$CXX" -print-file-name=libubsan.so)
for lib in "$libasan" "$libubsan"; do
  [[ -e "$lib" ]] || { echo "sanitize.sh: $CXX has no $(basename "$lib") (install its sanitizer runtimes)" >&2; exit 2; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/ksae-sanitize.XXXXXX")
if [[ "${KSAE_SANITIZE_KEEP:-0}" == 1 ]]; then
  echo "sanitize.sh: keeping $work"
else
  trap 'rm -rf "$work"' EXIT
fi
start=$SECONDS

echo "== venv: $work/venv"
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet --upgrade pip

echo "== build with -fsanitize=address,undefined ($CXX $("$CXX" -dumpfullversion), Debug, $opt -g); log: $work/build.log"
san="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
# pybind11_add_module makes a MODULE library, linked with CMAKE_MODULE_LINKER_FLAGS (CMake
# also passes CMAKE_CXX_FLAGS to the link); the SHARED flags are set too for any future target.
build_cmd=("$py" -m pip install -v ".[test]"
  -Ccmake.build-type=Debug
  -Ccmake.define.CMAKE_CXX_FLAGS="$san"
  -Ccmake.define.CMAKE_CXX_FLAGS_DEBUG="$opt -g"
  -Ccmake.define.CMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined"
  -Ccmake.define.CMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined"
  -Cbuild.verbose=true
  -Cbuild-dir="$work/build")
printf "%q " "${build_cmd[@]}"; echo
if ! "${build_cmd[@]}" >"$work/build.log" 2>&1; then
  tail -n 60 "$work/build.log" >&2
  echo "sanitize.sh: FAILED to build (full log: $work/build.log)" >&2
  trap - EXIT
  exit 1
fi

# The flags must have reached the compiler and the linker, not only the CMake cache: the
# compile line of every source of the extension (cpp/bindings/*.cpp) must carry them.
sources=(cpp/bindings/*.cpp)
for src in "${sources[@]}"; do
  compile_line=$(grep -E -- "-c [^ ]*${src//./\\.}( |\$)" "$work/build.log" | tail -n 1 || true)
  if [[ "$compile_line" != *"-fsanitize=address,undefined"* || "$compile_line" != *"$opt -g"* ]]; then
    echo "sanitize.sh: the compile line of $src lacks the sanitizer flags:" >&2
    echo "${compile_line:-<no compile line for $src in build.log>}" >&2
    exit 1
  fi
done
echo "compile (${#sources[@]} sources, the last): ${compile_line#*] }"
# Located without importing it: importing needs the ASan runtime preloaded (below).
platlib=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
so=$(find "$platlib/ksae" -maxdepth 1 -name '_core*.so' | head -n 1)
[[ -n "$so" ]] || { echo "sanitize.sh: no ksae/_core*.so under $platlib" >&2; exit 1; }
needed=$(readelf -d "$so" | grep NEEDED)
for want in libasan libubsan; do
  grep -q "$want" <<<"$needed" || { echo "sanitize.sh: $so is not linked with $want" >&2; exit 1; }
done
echo "extension: $so (links $(grep -oE 'lib(asan|ubsan|gomp)[^]]*' <<<"$needed" | tr '\n' ' '))"

# Python is not built with ASan, so its runtime must be loaded before anything else: preload it
# (ASan first, then UBSan).
# detect_leaks=0: CPython deliberately leaves interned objects and module state allocated at
# exit, so LeakSanitizer would report thousands of "leaks" that are not ksae's.
# Any error aborts the process: abort_on_error/halt_on_error here, -fno-sanitize-recover=undefined
# at compile time.
# OpenMP: libgomp's worker threads are started through ASan's pthread_create interceptor, so they
# are tracked like any thread; no suppressions are used, and none were needed.
export LD_PRELOAD="$libasan:$libubsan${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1"
export PYTHONFAULTHANDLER=1 PYTHONDONTWRITEBYTECODE=1
# The tests must import the sanitized build in the venv, never the source tree's python/ (the
# package lives in python/ksae, so the repository root on sys.path does not shadow it).
unset PYTHONPATH
echo "LD_PRELOAD=$LD_PRELOAD"
echo "ASAN_OPTIONS=$ASAN_OPTIONS"
echo "UBSAN_OPTIONS=$UBSAN_OPTIONS"
"$py" - "$so" <<'PY'
import os, sys
import ksae, ksae._core
assert os.path.samefile(ksae._core.__file__, sys.argv[1]), (ksae._core.__file__, sys.argv[1])
print("imported:", ksae._core.__file__, ksae.build_info())
PY

# Sanitizer reports are written to file descriptor 2. --capture=sys makes pytest capture only
# Python's sys.stdout/sys.stderr, so a report reaches the terminal even when it aborts the process
# mid-test (with the default fd capture it would be lost with the capture file). The output is
# also scanned, so a report from a process whose failure was tolerated still fails the run.
run_pytest() {
  local log="$work/pytest-$1.log" allow_empty=$2; shift 2
  local cmd=("$py" -m pytest "$@" -q -p no:cacheprovider --capture=sys --rootdir="$repo")
  echo "${cmd[*]}"
  local rc=0
  "${cmd[@]}" 2>&1 | tee "$log" || rc=$?
  if grep -qE 'ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer' "$log"; then
    echo "sanitize.sh: FAILED: sanitizer report above (pytest exit status $rc)" >&2
    exit 1
  fi
  if ((rc == 5 && allow_empty)); then
    echo "(no test of this part was selected)"
  elif ((rc != 0)); then
    echo "sanitize.sh: FAILED: pytest exit status $rc" >&2
    exit "$rc"
  fi
}

kernel_tests=(tests/test_kernels.py tests/test_gradients.py)
echo "== pytest under ASan+UBSan: kernel tests"
run_pytest kernels 0 "${kernel_tests[@]}" "$@"
if ((!kernels_only)); then
  echo "== pytest under ASan+UBSan: the rest of the suite"
  # Exit status 5 (nothing selected) is accepted here only when extra arguments such as -k
  # narrowed the selection.
  run_pytest rest $(($# > 0)) tests "${kernel_tests[@]/#/--ignore=}" "$@"
fi
echo "== sanitize.sh: passed, no sanitizer reports ($((SECONDS - start)) s)"
