"""Benchmark: does feeding the engine from the next shard keep it busier?

Runs the same job on the embedded model with `run.shards_per_worker` = 1 (a worker gets
its next shard only after committing the last: the engine drains at every boundary) and
= 2 (the default: the next shard is read and queued while the current one generates).
Runs alternate, in one process and one Ray cluster, so machine noise hits both alike; the
result is the ratio of their generation throughput, written to benchmarks/overlap.md.

    .venv/bin/python scripts/bench_overlap.py [--rounds 2] [--rows 160]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batchinfer import runner  # noqa: E402
from batchinfer.config_loader import config_from_dict  # noqa: E402
from scripts.sample_prompts import write_sample_prompts  # noqa: E402


def one_run(workdir: Path, shards_per_worker: int, rows: int, tag: str) -> dict:
    cfg = config_from_dict({
        "input": {"path": str(workdir / "prompts"), "id_column": "id"},
        "output": {"path": str(workdir / f"out-{tag}")},
        "engine": {"max_batch_size": 8},
        "sampling": {"max_tokens": 16},
        "run": {"num_workers": 1, "rows_per_shard": 10, "shards_per_worker": shards_per_worker},
    })
    report = runner.run(cfg, progress=False)
    assert report.status == "completed" and report.manifest["rows"]["ok"] == rows, report.manifest
    return report.manifest["this_run"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=160)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "overlap.md"))
    args = ap.parse_args()

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_sample_prompts(str(workdir / "prompts"), files=1, rows_per_file=args.rows,
                             row_group_size=10)
        for r in range(args.rounds):
            for spw in (1, 2) if r % 2 == 0 else (2, 1):
                started = time.time()
                stats = one_run(workdir, spw, args.rows, f"{spw}-{r}")
                results[spw].append(stats)
                print(f"round {r} shards_per_worker={spw}: {stats['rows_per_s']:.2f} rows/s, "
                      f"{stats['tokens_per_s']:.1f} tok/s ({time.time() - started:.0f} s)", flush=True)
    ray.shutdown()

    def med(spw, key):
        return statistics.median(s[key] for s in results[spw])

    ratio_rows = med(2, "rows_per_s") / med(1, "rows_per_s")
    ratio_tok = med(2, "tokens_per_s") / med(1, "tokens_per_s")
    lines = [
        "# Cross-shard overlap benchmark",
        "",
        f"`scripts/bench_overlap.py --rounds {args.rounds} --rows {args.rows}`, "
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()} with {_cpus()} CPUs, no GPU.",
        "Embedded SmolLM2-135M-Instruct (transformers, CPU), 1 worker, max_batch_size 8, "
        "shards of 10 rows, max_tokens 16. Throughput is over generation time (after the "
        "engine loaded); runs alternate in one process, medians over rounds.",
        "",
        "| shards_per_worker | rows/s | tokens/s | runs |",
        "| --- | --- | --- | --- |",
        f"| 1 (engine drains at each shard boundary) | {med(1, 'rows_per_s'):.2f} | {med(1, 'tokens_per_s'):.1f} | {len(results[1])} |",
        f"| 2 (default: next shard queued while this one generates) | {med(2, 'rows_per_s'):.2f} | {med(2, 'tokens_per_s'):.1f} | {len(results[2])} |",
        "",
        f"**Ratio (2 vs 1): {ratio_rows:.2f}x rows/s, {ratio_tok:.2f}x tokens/s.**",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
