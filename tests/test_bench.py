"""scripts/bench.py cannot rot: every part runs end to end at its tiny size (numbers
meaningless, not timed) and writes its tables, targets and settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PART_KEYS = {"a": "cpu_model", "b": "simulated", "c": "ceiling", "d": "scale"}


@pytest.mark.slow
def test_every_part_of_the_benchmark_runs_at_its_tiny_size(tmp_path):
    out, raw = tmp_path / "RESULTS.md", tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--size", "tiny", "--out", str(out),
                           "--json", str(raw), "--workdir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(raw.read_text())
    assert results["failures"] == [] and sorted(results["parts"]) == ["a", "b", "c", "d"]
    assert results["meta"]["size"] == "tiny" and results["meta"]["commit"]
    for letter, part in results["parts"].items():
        assert part["key"] == PART_KEYS[letter] and part["settings"], letter
        assert part["tables"] and all(t["rows"] for t in part["tables"]), letter
        assert all(len(row) == len(t["columns"]) for t in part["tables"] for row in t["rows"]), letter
        assert part["targets"], f"part {letter} checks none of the issue's targets"
    simulated_rows = [row for t in results["parts"]["b"]["tables"] for row in t["rows"]]
    assert {"batchinfer, prefix_order on", "batchinfer, prefix_order off"} <= {row[1] for row in simulated_rows}
    text = out.read_text()
    assert "## Targets (issue 11)" in text and "no GPU" in text
    for letter, part in results["parts"].items():
        assert f"## {letter}. {part['title']}" in text


def test_bench_refuses_an_unknown_part():
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--parts", "bx"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--parts: unknown ['x']" in proc.stderr
