#!/usr/bin/env bash
# Quick start: set up .venv, write sample prompts, run the embedded default job, show results.
#
#   ./scripts/demo.sh [extra `batchinfer run` options, e.g. --new-run]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export TOKENIZERS_PARALLELISM=false

if [[ ! -d data/prompts ]]; then
  .venv/bin/python scripts/sample_prompts.py data/prompts --files 2 --rows-per-file 100
  echo "demo: wrote 200 sample prompts to data/prompts/"
fi

status=0
.venv/bin/batchinfer run configs/local.yaml "$@" || status=$?
if [[ -d out/local ]]; then
  .venv/bin/python - <<'PY'
import pyarrow.dataset as ds
t = ds.dataset("out/local", format="parquet").to_table()
print(f"\ndemo: {t.num_rows} result rows in out/local/ (part-*.parquet; metadata in out/local/_batchinfer/)")
for row in t.slice(0, 3).to_pylist():
    print(f"  [{row['id']}] {row['output']!r}  ({row['finish_reason']}, {row['completion_tokens']} tokens)")
print("read them with: pandas.read_parquet('out/local')  or  duckdb: select * from 'out/local/*.parquet'")
PY
  .venv/bin/batchinfer report out/local --html out/local-report.html >/dev/null \
    && echo "demo: the run's report (throughput, shard timeline, histograms, cost): out/local-report.html"
  echo "demo: its state, as a scheduler reads it: .venv/bin/batchinfer status out/local --json"
fi
exit $status
