"""Benchmark: planning 1,000 small Parquet files on an S3 server on 127.0.0.1.

Planning lists the prefix once and reads each file once for its footer and ids (a small file:
one GET of the whole object, If-Match its listed ETag), on a thread pool. This times the planner as shipped and with the pool cut to
one thread, alternating against the same server, once as is and once with a per-request
delay like S3's time to first byte, and writes the table to benchmarks/plan_s3.md.

    .venv/bin/python scripts/bench_plan_s3.py [--files 1000] [--rounds 3] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from batchinfer import plan as planning, readers  # noqa: E402
from batchinfer.config_loader import config_from_dict  # noqa: E402
from scripts.benchlib import s3_loopback  # noqa: E402
from scripts.sample_prompts import prompt  # noqa: E402


def measure(files: int, rounds: int, latency_ms: float) -> dict[int, float]:
    """Median planning time with the shipped thread pool and with one thread."""
    import s3fs

    with s3_loopback.server(latency_ms) as endpoint:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        fs.mkdir("bench")
        blobs = {}
        for i in range(files):
            buf = io.BytesIO()
            pq.write_table(pa.table({"id": [f"f{i}-{r}" for r in range(10)],
                                     "prompt": [prompt(i * 10 + r) for r in range(10)]}), buf)
            blobs[f"bench/prompts/part-{i:05d}.parquet"] = buf.getvalue()
        fs.pipe(blobs)
        cfg = config_from_dict({"input": {"path": "s3://bench/prompts/", "id_column": "id"},
                                "storage": {"endpoint_url": endpoint}, "run": {"rows_per_shard": 10}})
        shipped = readers.base.FACTS_READ_THREADS
        timings: dict[int, list[float]] = {shipped: [], 1: []}
        for r in range(rounds):
            for threads in (shipped, 1) if r % 2 == 0 else (1, shipped):
                readers.base.FACTS_READ_THREADS = threads
                started = time.perf_counter()
                plan = planning.make_plan(cfg)
                elapsed = time.perf_counter() - started
                assert len(plan.files) == files and plan.total_rows == 10 * files
                timings[threads].append(elapsed)
                print(f"latency {latency_ms:g} ms, round {r}: {threads:>2} threads: {elapsed:.2f} s",
                      flush=True)
        readers.base.FACTS_READ_THREADS = shipped
        return {t: statistics.median(v) for t, v in timings.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=20.0,
                    help="added per request in the second measurement, like S3's time to first byte")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "plan_s3.md"))
    args = ap.parse_args()
    shipped = readers.base.FACTS_READ_THREADS
    rows = []
    for latency in (0.0, args.latency_ms):
        t = measure(args.files, args.rounds, latency)
        rows.append(f"| {latency:g} ms | {t[shipped]:.2f} s ({args.files / t[shipped]:.0f} files/s) "
                    f"| {t[1]:.2f} s ({args.files / t[1]:.0f} files/s) | {t[1] / t[shipped]:.1f}x |")
    lines = [
        f"# Planning {args.files:,} files on S3",
        "",
        f"`scripts/bench_plan_s3.py --files {args.files} --rounds {args.rounds} --latency-ms "
        f"{args.latency_ms:g}`, {time.strftime('%Y-%m-%d')}, {platform.machine()} with "
        f"{os.cpu_count()} CPUs. moto's S3 server in its own process on 127.0.0.1, each file "
        "10 rows. `make_plan` = one listing, one read per file (a GET of the whole object, "
        "footer and ids from memory), the id check, shard cutting. The second row adds a fixed "
        "delay to every request, standing in for S3's time to first byte. Medians over "
        "alternating rounds.",
        "",
        f"| added latency per request | {shipped} read threads (shipped) | 1 thread | ratio |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
