#!/usr/bin/env bash
# Build and install ksae on a machine without network access and without cmeel-eigen, from
# a copy of Eigen carried along in .device/eigen (git-ignored).
#
#   benchmarks/device_setup.sh --prepare   # here, with network: copy Eigen into .device/eigen
#   benchmarks/device_setup.sh             # there, offline: build and install ksae with it
#
# CMakeLists.txt finds Eigen with find_package(Eigen3 3.4 CONFIG HINTS <cmeel prefix>); where
# `python -m cmeel cmake` gives no prefix (no cmeel-eigen), Eigen3_DIR names the directory
# holding Eigen3Config.cmake instead. The copy keeps cmeel's layout (include/eigen3 and
# share/eigen3/cmake), since Eigen3Targets.cmake finds the headers relative to itself.
#
# The target machine must already have pip, scikit-build-core, pybind11, cmake, ninja and
# ksae's run-time dependencies (numpy, safetensors); --no-build-isolation uses them as
# installed, --no-deps keeps pip from resolving anything, PIP_NO_INDEX=1 from the network.
#
# Variables: PYTHON (default python3), KSAE_EIGEN_PREFIX (default .device/eigen), and for
# --prepare CMEEL_PYTHON, a Python with cmeel-eigen installed (default $PYTHON).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EIGEN_PREFIX=${KSAE_EIGEN_PREFIX:-$PWD/.device/eigen}

if [[ ${1:-} == --prepare ]]; then
  CMEEL_PYTHON=${CMEEL_PYTHON:-$PYTHON}
  source_prefix=$("$CMEEL_PYTHON" -m cmeel cmake)
  test -f "$source_prefix/share/eigen3/cmake/Eigen3Config.cmake" || {
    echo "no Eigen under $source_prefix: install cmeel-eigen for $CMEEL_PYTHON" >&2; exit 1; }
  rm -rf "$EIGEN_PREFIX"
  mkdir -p "$EIGEN_PREFIX/include" "$EIGEN_PREFIX/share"
  cp -r "$source_prefix/include/eigen3" "$EIGEN_PREFIX/include/"
  cp -r "$source_prefix/share/eigen3" "$EIGEN_PREFIX/share/"
  echo "Eigen $(sed -n 's/.*EIGEN3_VERSION_STRING *"\(.*\)".*/\1/p' \
    "$EIGEN_PREFIX/share/eigen3/cmake/Eigen3Config.cmake") copied to $EIGEN_PREFIX ($(du -sh "$EIGEN_PREFIX" | cut -f1))"
  exit 0
fi

eigen_dir=$EIGEN_PREFIX/share/eigen3/cmake
test -f "$eigen_dir/Eigen3Config.cmake" || {
  echo "no Eigen3Config.cmake in $eigen_dir: run '$0 --prepare' where cmeel-eigen is installed and carry .device/eigen" >&2
  exit 1; }
"$PYTHON" -c "import scikit_build_core, pybind11, numpy, safetensors" || {
  echo "$PYTHON lacks one of scikit-build-core, pybind11, numpy, safetensors (needed offline)" >&2; exit 1; }

PIP_NO_INDEX=1 "$PYTHON" -m pip install --no-build-isolation --no-deps \
  -Ccmake.define.Eigen3_DIR="$eigen_dir" .
# Run from outside the source tree, so that the installed package (with its _core) is the one imported.
(cd / && "$PYTHON" -c "import ksae; print('ksae', ksae.__version__, ksae.build_info())")
