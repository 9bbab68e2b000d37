#!/usr/bin/env bash
# Build ksae's C++ core with AddressSanitizer + UndefinedBehaviorSanitizer (GCC) in a throwaway
# virtual environment and run the kernel tests against that build. Exits non-zero on any test
# failure or sanitizer report (a report aborts the process; reports are also written to files
# that are checked afterwards, so one raised in a subprocess whose output pytest captured still
# fails the run).
#
# Usage: scripts/sanitize.sh [--all] [extra pytest arguments]
#   --all   run the whole test suite, not only tests/test_kernels.py and tests/test_gradients.py
# Environment: KSAE_SANITIZE_OPT (default -O1: -O0 Eigen under ASan is much slower; the build
#   type stays Debug, so NDEBUG is unset and Eigen's own assertions stay on),
#   KSAE_SANITIZE_KEEP=1 keeps the temporary directory (venv, build tree, logs).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

tests=(tests/test_kernels.py tests/test_gradients.py)
if [[ "${1:-}" == "--all" ]]; then
  tests=(tests)
  shift
fi
opt=${KSAE_SANITIZE_OPT:--O1}

# GCC only: the runtime preloaded below must be the one the extension was linked against.
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
if ! "$py" -m pip install -v ".[test]" \
    -Ccmake.build-type=Debug \
    -Ccmake.define.CMAKE_CXX_FLAGS="$san" \
    -Ccmake.define.CMAKE_CXX_FLAGS_DEBUG="$opt -g" \
    -Ccmake.define.CMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
    -Ccmake.define.CMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
    -Cbuild.verbose=true \
    -Cbuild-dir="$work/build" >"$work/build.log" 2>&1; then
  tail -n 60 "$work/build.log" >&2
  echo "sanitize.sh: FAILED to build" >&2
  exit 1
fi

# The flags must have reached the compiler and the linker, not only the CMake cache.
compile_line=$(grep -E -- '-c [^ ]*bindings\.cpp' "$work/build.log" | tail -n 1 || true)
if [[ "$compile_line" != *"-fsanitize=address,undefined"* || "$compile_line" != *"$opt -g"* ]]; then
  echo "sanitize.sh: the compile line lacks the sanitizer flags:" >&2
  echo "${compile_line:-<no compile line for bindings.cpp in build.log>}" >&2
  exit 1
fi
echo "compile: ${compile_line#*] }"
# (Located without importing it: importing needs the ASan runtime preloaded, see below.)
platlib=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
so=$(find "$platlib/ksae" -maxdepth 1 -name '_core*.so' | head -n 1)
[[ -n "$so" ]] || { echo "sanitize.sh: no ksae/_core*.so under $platlib" >&2; exit 1; }
needed=$(readelf -d "$so" | grep NEEDED)
for want in libasan libubsan; do
  grep -q "$want" <<<"$needed" || { echo "sanitize.sh: $so is not linked with $want" >&2; exit 1; }
done
echo "extension: $so (links $(grep -oE 'lib(asan|ubsan|gomp)[^]]*' <<<"$needed" | tr '\n' ' '))"

# Python is not built with ASan, so the runtime must be loaded before anything else: preload it
# (ASan first, then UBSan). detect_leaks=0: CPython deliberately leaves interned objects and
# module state allocated at exit, so LeakSanitizer would report thousands of "leaks" that are
# not ksae's. Any error aborts the process (abort_on_error, halt_on_error, and
# -fno-sanitize-recover=undefined at compile time); log_path also writes every report to a file,
# checked below. OpenMP: libgomp's worker threads are created via the intercepted
# pthread_create, so ASan tracks them; no suppressions are used.
mkdir -p "$work/reports"
export LD_PRELOAD="$libasan:$libubsan${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1:strict_init_order=1:check_initialization_order=1:log_path=$work/reports/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1:log_path=$work/reports/ubsan"
export PYTHONFAULTHANDLER=1 PYTHONDONTWRITEBYTECODE=1
# Keep the venv's package (not the source tree's python/) on sys.path.
unset PYTHONPATH

# The tests must import the sanitized build from the venv, never the source tree's python/.
"$py" - "$so" <<'PY'
import os, sys
import ksae, ksae._core
assert os.path.samefile(ksae._core.__file__, sys.argv[1]), (ksae._core.__file__, sys.argv[1])
print("imported:", ksae._core.__file__, ksae.build_info())
PY

echo "== pytest under ASan+UBSan: ${tests[*]} $*"
cmd=("$py" -m pytest "${tests[@]}" -q -p no:cacheprovider --rootdir="$repo" "$@")
echo "LD_PRELOAD=$LD_PRELOAD"
echo "ASAN_OPTIONS=$ASAN_OPTIONS"
echo "UBSAN_OPTIONS=$UBSAN_OPTIONS"
echo "${cmd[*]}"
set +e
"${cmd[@]}"
rc=$?
set -e
unset LD_PRELOAD

reports=$(find "$work/reports" -type f | sort)
if [[ -n "$reports" ]]; then
  while IFS= read -r f; do
    echo "----- sanitizer report: $(basename "$f") -----" >&2
    cat "$f" >&2
  done <<<"$reports"
  echo "sanitize.sh: FAILED: sanitizer report(s) above (pytest exit status $rc)" >&2
  exit 1
fi
if ((rc != 0)); then
  echo "sanitize.sh: FAILED: pytest exit status $rc" >&2
  exit "$rc"
fi
echo "== sanitize.sh: passed, no sanitizer reports ($((SECONDS - start)) s)"
