#!/usr/bin/env bash
# Set up .venv with the dev extras and run the whole test suite (CI runs exactly this).
#
#   ./scripts/test.sh                 # everything
#   ./scripts/test.sh -m "not slow"   # skip the subprocess/SIGKILL end-to-end tests
# The tests start and stop their own services: a local Ray cluster, and an S3 server on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --dev
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
