#!/usr/bin/env bash
# One entry point for a fresh machine:
#   tools/dev.sh setup          create .venv and install pdserve with its test dependencies
#   tools/dev.sh test [ARGS]    setup, then run the test suite (what CI runs)
#   tools/dev.sh serve [ARGS]   setup, then run the dev server on the bundled default model
# torch is held at the CPU build by constraints.txt so no CUDA build is ever pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

setup() {
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
  fi
  # Install torch alone first: the pin resolves to the CPU wheel before anything else can ask for torch.
  .venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
  # Build the CPU expert kernel once (~40 s; cached), not inside the first server or test that needs it.
  .venv/bin/python -m engine.kernels.cpu_gemm
  # promtool (Debian's prometheus package) checks the /metrics exposition in the tests
  if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq prometheus >/dev/null) || echo "warning: could not install promtool" >&2
  fi
}

cmd=${1:-test}
shift || true
case "$cmd" in
  setup) setup ;;
  test) setup; exec .venv/bin/python -m pytest -q "$@" ;;
  serve) setup; exec .venv/bin/pdserve serve "$@" ;;
  *) echo "usage: tools/dev.sh setup|test|serve [ARGS]" >&2; exit 2 ;;
esac
