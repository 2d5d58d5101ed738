#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` from the source vendored in the pinned llama-cpp-python
# sdist, for the benchmark's llama-server peer (bench part `llama`). Not needed by the server or CI.
#
#   scripts/build_llama_server.sh [BUILD_DIR]     (default: .cache/llama-server, git-ignored)
#
# Idempotent: installs cmake and g++ from Debian only when missing, downloads the sdist only when
# absent, and returns at once when the binary exists. The binary ends up at BUILD_DIR/bin/llama-server.
# Building takes many CPU minutes; on a shared machine run it under `nice -n 19`.
set -euo pipefail

VERSION=0.3.36
root=$(cd "$(dirname "$0")/.." && pwd)
build_dir=$(realpath -m "${1:-$root/.cache/llama-server}")
binary=$build_dir/bin/llama-server

if [[ -x $binary ]]; then
  echo "llama-server: $binary (built already)"
  exit 0
fi

missing=()
for pkg in cmake g++ make; do
  dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null | grep -qx installed || missing+=("$pkg")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  echo "installing: ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

start=$SECONDS
mkdir -p "$build_dir/sdist"
sdist=$(find "$build_dir/sdist" -maxdepth 1 -name "llama_cpp_python-$VERSION.tar.gz" | head -n 1)
if [[ -z $sdist ]]; then
  # Only the source archive is wanted (pip prepares its metadata, but builds nothing).
  python3 -m pip download -q --no-binary :all: --no-deps \
    -d "$build_dir/sdist" "llama-cpp-python==$VERSION"
  sdist=$build_dir/sdist/llama_cpp_python-$VERSION.tar.gz
fi
src=$build_dir/src
if [[ ! -d $src/vendor/llama.cpp ]]; then
  rm -rf "$src" && mkdir -p "$src"
  tar -xzf "$sdist" -C "$src" --strip-components=1
fi

# Only the server: no curl (nothing is downloaded at run time), no tests, no examples.
cmake -S "$src/vendor/llama.cpp" -B "$build_dir/cmake" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DGGML_NATIVE=ON >/dev/null
cmake --build "$build_dir/cmake" --target llama-server -j "$(nproc)"
mkdir -p "$build_dir/bin"
cp "$build_dir/cmake/bin/llama-server" "$binary"
echo "llama-server: $binary (built in $((SECONDS - start)) s)"
