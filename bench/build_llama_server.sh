#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (and `llama-bench`) from the source that the llama-cpp-python sdist on PyPI
# vendors, for bench/bench_serve.py's comparison. The binary is cached: a second run only prints its path.
#
#     bash bench/build_llama_server.sh [WORK_DIR]      # default bench-work/llama; needs cmake and a C++ compiler
set -euo pipefail
work="${1:-bench-work/llama}"
version="0.3.36"  # llama-cpp-python's; its vendor/llama.cpp is the llama.cpp the figures were measured with
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
bin="$src/build/bin/llama-server"
if [[ ! -x "$bin" ]]; then
    mkdir -p "$work"
    python -m pip download --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work" >&2
    tar xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
    cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
    cmake --build "$src/build" --target llama-server llama-bench -j "$(nproc)" >&2
fi
echo "$bin"
