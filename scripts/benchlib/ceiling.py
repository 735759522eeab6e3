"""Part c, the framework ceiling: with an engine that answers at once (instant.py), how many
rows/s go through read -> chat template -> tokenize -> schedule -> write -> commit?

batchinfer (1 and 2 workers) against the same work in Ray Data (raydata.py, async actor
around the same engine: how Ray Data LLM drives vLLM), back to back on the benchmark's Ray.
Then a profile of batchinfer's worker path: `ShardWorker.process` over every shard, in a
subprocess without Ray (as tests/test_worker.py builds it), sampled by py-spy; its top
functions go to benchmarks/profile_ceiling.txt, the input for making the worker faster.

    python -m scripts.benchlib.ceiling worker CONFIG.json RESULT.json   (the profiled child)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scripts.benchlib import common, raydata
from scripts.benchlib.cpu_model import load_note, run_batchinfer_steady

BACKEND = "scripts.benchlib.instant:InstantEngine"
TARGET = 1.5
PROFILE_RATE = 500
"""py-spy samples per second."""
TOP = 25


@dataclass(frozen=True)
class Size:
    rows: int
    files: int
    rows_per_shard: int
    prompt_tokens: int
    max_tokens: int
    workers: tuple[int, ...]
    """batchinfer workers, one run each."""
    actors: tuple[int, ...]
    """Ray Data actors, one run each (Ray Data spends 20-60 s here before its first batch,
    so quick runs it with one actor only)."""
    again: bool = True
    """batchinfer with one worker runs again after Ray Data with one actor (tiny, whose numbers
    mean nothing, spares that worker's start)."""


SIZES = {
    "tiny": Size(rows=400, files=2, rows_per_shard=100, prompt_tokens=128, max_tokens=128, workers=(1,),
                 actors=(1,), again=False),
    "quick": Size(rows=16_000, files=16, rows_per_shard=512, prompt_tokens=128, max_tokens=128, workers=(1, 2),
                  actors=(1,)),
    "full": Size(rows=64_000, files=32, rows_per_shard=512, prompt_tokens=128, max_tokens=128, workers=(1, 2),
                 actors=(1, 2)),
}


def run(size: str, workdir: Path) -> common.Part:
    from batchinfer.config import EngineConfig

    s = SIZES[size]
    started = time.perf_counter()
    workdir = workdir / "ceiling"
    shutil.rmtree(workdir, ignore_errors=True)
    tok = common.tokenizer()
    inputs = common.write_prompts(workdir / "prompts", common.shape_prompts(s.rows, s.prompt_tokens, tok=tok),
                                  files=s.files, row_group_size=s.rows_per_shard)

    def cfg(name: str, workers: int) -> dict[str, Any]:
        return common.base_config(
            workdir, name, inputs, engine={"backend": BACKEND}, sampling={"max_tokens": s.max_tokens},
            run={"num_workers": workers, "rows_per_shard": s.rows_per_shard,
                 "runtime_env": {"env_vars": {"PYTHONPATH": str(common.REPO)}}})

    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    # batchinfer with one worker runs before and after Ray Data with one actor (the target's
    # comparison), so that the drift of this shared machine shows in the pair.
    for w in sorted(set(s.workers) | set(s.actors)):
        if w in s.workers:
            runs.append({"run": "batchinfer", **run_batchinfer_steady(cfg(f"batchinfer-{w}", w))})
        if w in s.actors:
            runs.append({"run": "Ray Data (async actor)",
                         **raydata.run_ray_data(cfg(f"raydata-{w}", w), workers=w, style="async")})
        if w == 1 and w in s.workers and s.again:
            runs.append({"run": "batchinfer", **run_batchinfer_steady(cfg("batchinfer-1-again", w))})
    rd_async = next(r for r in runs if r["run"] == "Ray Data (async actor)" and r["workers"] == 1)
    bi1 = [r["rows_per_s"] for r in runs if r["run"] == "batchinfer" and r["workers"] == 1]
    profile_path = (workdir if size == "tiny" else common.REPO / "benchmarks") / "profile_ceiling.txt"
    profile = profile_worker(cfg("profile", 1), profile_path, size, modes=("gil",) if size == "tiny" else ("gil", "all"))

    part = common.Part(
        key="ceiling", title="Framework ceiling (an engine that answers at once)",
        settings={"backend": BACKEND, **asdict(s), "engine.max_batch_size": EngineConfig().max_batch_size,
                  "cpus_per_worker": 1,
                  "ray_data_batch_size": rd_async["batch_size"],
                  "ray_data_max_concurrency": rd_async["max_concurrency"],
                  "profiler": profile["profiler"], "profile_rate_hz": PROFILE_RATE},
        raw={"runs": runs, "profile": profile, "load_average": [load_before, os.getloadavg()]})
    peers = {r["workers"]: r for r in runs if r["run"] == "Ray Data (async actor)"}
    table = common.Table("Rows/s through read → chat template → tokenize → schedule → write (→ commit)",
                         ["run", "workers", "wall s", "steady s", "rows", "rows/s (steady)", "rows/s per worker",
                          "× Ray Data", "rows/s (wall)"])
    for r in runs:
        peer = peers.get(r["workers"])
        table.rows.append([r["run"], r["workers"], f"{r['total_s']:.1f}", f"{r.get('steady_s', r['generate_s']):.2f}",
                           r["rows"], f"{r['rows_per_s']:.0f}", f"{r['rows_per_s'] / r['workers']:.0f}",
                           f"{r['rows_per_s'] / peer['rows_per_s']:.2f}" if peer else "",
                           f"{r['rows'] / r['total_s']:.0f}"])
    table.rows.append([f"batchinfer worker in process, no Ray ({profile['profiler']} running)", 1,
                       f"{profile['total_s']:.1f}", f"{profile['process_s']:.2f}", profile["rows"],
                       f"{profile['rows_per_s']:.0f}", f"{profile['rows_per_s']:.0f}", "",
                       f"{profile['rows'] / profile['total_s']:.0f}"])
    part.tables.append(table)
    part.targets.append(common.Target(
        "Framework ceiling (instant engine, 1 worker): batchinfer rows/s ≥ 1.5 × Ray Data's",
        round(statistics.mean(bi1) / rd_async["rows_per_s"], 3), ">=", TARGET, "×"))
    part.notes += [
        f"The target compares the mean of batchinfer's one-worker runs before and after Ray Data's "
        f"({', '.join(f'{v:.0f}' for v in bi1)} rows/s) with Ray Data's {rd_async['rows_per_s']:.0f}.",
        f"Profile of the worker path: {profile_path.relative_to(common.REPO) if size != 'tiny' else profile_path} "
        "(ShardWorker.process in one process without Ray: where the GIL goes, and every thread on the CPU).",
        "Steady spans: batchinfer from all workers loaded to the last shard committed; Ray Data from its "
        "first batch started to its last batch done (its read and repartition come before, the last "
        "block's write after). Wall time includes Ray actor start-up and planning.",
        raydata.startup_note(rd_async),
        "The two do not do the same bookkeeping: batchinfer also writes latency_s and each shard's summary "
        "into its part, commits one part per shard atomically with a commit record and a lease check; the "
        "Ray Data pipeline writes id and the result columns and has no exactly-once commit.",
        "Two workers share the machine's 2 cores with the driver and Ray's own processes: per-worker rows/s "
        "at 2 workers shows contention, not scaling.",
        load_note(load_before),
        "The in-process worker row has no Ray (no actor calls, no driver scheduling) and runs under the "
        "profiler, which takes some of the same 2 cores.",
    ]
    part.seconds = round(time.perf_counter() - started, 1)
    return part


# ---------------------------------------------------------------------- the profile


MODES = {
    "gil": ("--gil", "Where the GIL goes (py-spy --gil: only the thread holding the GIL is sampled)"),
    "all": (None, "Every thread on the CPU (no --gil: native code that let the GIL go, such as the Rust "
                  "tokenizer, shows here; a thread waiting for the GIL counts too, at the frame it waits in)"),
}


def profile_worker(cfg: dict[str, Any], path: Path, size: str, modes: tuple[str, ...] = ("gil", "all")) -> dict[str, Any]:
    """Run `worker` in a child under py-spy once per mode (MODES), or under cProfile where
    py-spy cannot sample here, and write the top of the profile to `path`; return the
    child's numbers (of the first mode's run)."""
    tmp = Path(cfg["output"]["path"]).parent / "profile-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(cfg))
    child = [sys.executable, "-m", "scripts.benchlib.ceiling", "worker", str(tmp / "config.json"),
             str(tmp / "result.json")]
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    sections, runs = [], []
    for mode in modes:
        flag, title = MODES[mode]
        raw = tmp / f"{mode}.txt"
        done = _child([spy, "record", "--format", "raw", "--function", "--threads", "--rate", str(PROFILE_RATE),
                       *([flag] if flag else []), "--output", str(raw), "--", *child], cfg, check=False)
        if done.returncode != 0 or not raw.exists() or not raw.stat().st_size:
            break
        runs.append(json.loads((tmp / "result.json").read_text()))
        sections += _report_spy(_read_raw(raw), runs[-1], title, top=TOP if mode == modes[0] else TOP // 2)
    if runs:
        result, profiler = {**runs[0], "runs": runs}, "py-spy"
    else:  # no ptrace here: profile the event-loop thread only
        _child([*child, "--cprofile", str(tmp / "cprofile.out")], cfg, check=True)
        result, profiler = json.loads((tmp / "result.json").read_text()), "cProfile"
        sections = _report_cprofile(tmp / "cprofile.out", done.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(_header(result, size) + sections))
    return {**result, "profiler": profiler, "path": str(path)}


def _child(command: list[str], cfg: dict[str, Any], check: bool) -> subprocess.CompletedProcess:
    shutil.rmtree(cfg["output"]["path"], ignore_errors=True)  # every run starts a fresh run directory
    return subprocess.run(command, cwd=common.REPO, env={**os.environ, **common.WORKER_ENV},
                          capture_output=True, text=True, check=check)


def _read_raw(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's collapsed stacks: (frames root first, samples)."""
    stacks = []
    for line in path.read_text().splitlines():
        head, _, count = line.rpartition(" ")
        if head and count.isdigit():
            stacks.append((head.split(";"), int(count)))
    return stacks


def _name(frame: str) -> str:
    """'func (path/to/file.py:12)' with the path cut to its package, e.g. batchinfer/worker.py."""
    func, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "lib/python3", str(common.REPO) + "/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker == "lib/python3":
                where = "stdlib:" + where.split("/", 1)[-1]
    return f"{func} ({where})" if where else func


def _function(frame: str) -> str:
    """The bare function name of a py-spy frame ('Class.method (file:line)' -> 'method')."""
    return frame.partition(" (")[0].rpartition(".")[2]


def _in_event_loop(frames: list[str]) -> bool:
    return any(_function(f) == "run_until_complete" for f in frames)


def _in_worker_path(frames: list[str]) -> bool:
    """Samples of the shards being processed: the event loop, and the threads it hands
    reading, tokenizing, writing and committing to (start-up and imports are not), less
    threads waiting for work (py-spy counts a pool thread blocked on its queue as active)."""
    if _function(frames[-1]) == "_worker":
        return False
    return _in_event_loop(frames) or any(_function(f) == "_worker" for f in frames)


STAGES = (
    ("chat template (PromptBuilder.render)", ("PromptBuilder.render", "PromptBuilder.conversation")),
    ("tokenize (PromptBuilder.encode, less the template)", ("PromptBuilder.encode",)),
    ("read the shard, ids, seeds and row settings", ("._load", "._read", "._ids", "readers/", "read_pinned",
                                                     "row_seed", "storage.py", "rows.py")),
    ("requests: submit, await and gather per row", ("._submit", "._generate", "._finish", "._release_slot",
                                                     "ShardWorker.process", "._end_turn", "check_length",
                                                     "max_new_tokens")),
    ("results table, Parquet, commit", ("build_table", "to_parquet", "summarize", "._commit", "run_store.py",
                                        "atomic.py", "records.py", "lease.py", "results.py")),
)
"""The worker path's stages, by the innermost batchinfer function a sample is charged to."""


def _stage(caller: str) -> str:
    if caller.startswith("(outside batchinfer)"):
        return "event loop or thread pool, no batchinfer frame"
    return next((stage for stage, marks in STAGES if any(m in caller for m in marks)), "other batchinfer code")


def _report_spy(stacks: list[tuple[list[str], int]], result: dict[str, Any], title: str, top: int) -> list[str]:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    imports: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    for frames, count in stacks:
        if not _in_worker_path(frames):
            continue
        names = [_name(f) for f in frames if not f.startswith(("thread ", "process "))]
        inner = [x for x in names if "batchinfer/" in x]
        caller = inner[-1] if inner else "(outside batchinfer) " + names[-1]
        threads["event loop" if _in_event_loop(frames) else "threads of asyncio.to_thread"] += count
        if any(_function(f) == "_find_and_load" for f in frames):
            imports[caller] += count  # a module imported on first use: once per process, not per row
            continue
        own[names[-1]] += count
        for name in set(inner):
            total[name] += count
        ours[caller] += count
        stages[_stage(caller)] += count
    n = max(sum(threads.values()), 1)
    rest = max(n - sum(imports.values()), 1)
    ticks = result["process_s"] * PROFILE_RATE
    lines = [f"== {title}",
             f"{n} samples in the worker path: {n / ticks:.2f} x the {result['process_s']:.1f} s that process() "
             f"ran ({result['rows_per_s']:.0f} rows/s in this run), i.e. the share of that time the GIL was held "
             "(--gil) or the threads on the CPU on average.",
             "Threads: " + ", ".join(f"{k} {v / n:.0%}" for k, v in threads.most_common()),
             f"Imports on first use inside process(), once per worker process: {sum(imports.values()) / n:.0%} of "
             "the samples, under " + (", ".join(f"{k} {v / n:.0%}" for k, v in imports.most_common(3)) or "none")
             + ". Left out below, whose percentages are of the other samples.", ""]
    for heading, counter in (("By stage (each sample charged to the innermost batchinfer function on its stack)",
                              stages),
                             ("By the innermost batchinfer function on the stack (library time charged to the "
                              "batchinfer code that called it)", ours),
                             ("By own time (the function itself, not its callees)", own),
                             ("By total time, batchinfer functions (the function and everything it calls)",
                              total)):
        lines += [f"{heading}:", f"{'%':>6}  {'stage' if counter is stages else 'function (file:first line)'}"]
        lines += [f"{c / rest:6.1%}  {name}" for name, c in counter.most_common(top)]
        lines.append("")
    return lines


def _report_cprofile(stats_path: Path, why: str) -> list[str]:
    import io
    import pstats

    stream = io.StringIO()
    stats = pstats.Stats(str(stats_path), stream=stream)
    stats.sort_stats("tottime").print_stats(TOP)
    stats.sort_stats("cumulative").print_stats(TOP)
    return [f"py-spy could not run here ({why.strip()[-200:]}); cProfile of the event-loop thread only "
            "(work handed to threads with asyncio.to_thread is not in it).", "", stream.getvalue()]


def _header(result: dict[str, Any], size: str) -> list[str]:
    return [
        "Framework ceiling: where batchinfer's worker spends its time (issue 11, part c)",
        f"scripts/bench.py part 'ceiling', size {size}, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs.",
        f"batchinfer.worker.ShardWorker.process over {result['shards']} shards ({result['rows']} rows, "
        f"{result['shards_per_worker']} shards in flight as a worker holds them), in one process without Ray, "
        f"instant engine ({BACKEND}). Only the shards' processing is counted (the event loop and the "
        f"threads it hands work to), not start-up; py-spy record --function --threads --rate {PROFILE_RATE}.",
        ""]


# ---------------------------------------------------------------------- the profiled child


def worker_main(config_path: str, result_path: str, cprofile: str | None = None) -> None:
    """Build one ShardWorker as the scheduler would (plan recorded, lease held) and run
    every shard through `process`, `run.shards_per_worker` at a time."""
    from batchinfer.config_loader import config_from_dict
    from batchinfer.lease import DriverLease
    from batchinfer.lease_book import MIN_HELD
    from batchinfer.plan import make_plan
    from batchinfer.run_store import RunStore
    from batchinfer.worker import ShardWorker

    started = time.perf_counter()
    cfg = config_from_dict(json.loads(Path(config_path).read_text()))
    store = RunStore(cfg.output.path, cfg.storage)
    lease = DriverLease(store.meta, 3600)
    lease.acquire()
    plan = store.write_plan(make_plan(cfg))
    worker = ShardWorker(config=cfg, plan=plan, worker_index=0, generation=lease.generation)
    load_s = time.perf_counter() - started
    holds = cfg.run.shards_per_worker or MIN_HELD

    async def every_shard() -> list:
        held = asyncio.Semaphore(holds)

        async def one(i: int):
            async with held:
                return await worker.process(i, 1)

        return await asyncio.gather(*(one(i) for i in range(len(plan.shards))))

    profiler = None
    if cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.perf_counter()
    attempts = asyncio.run(every_shard())
    process_s = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(cprofile)
    rows = sum(a.summary.rows_ok for a in attempts)
    if rows != plan.total_rows:
        raise RuntimeError(f"the worker committed {rows} rows ok of {plan.total_rows}")
    Path(result_path).write_text(json.dumps({
        "rows": rows, "shards": len(plan.shards), "shards_per_worker": holds,
        "load_s": round(load_s, 3), "process_s": round(process_s, 3), "total_s": round(load_s + process_s, 3),
        "rows_per_s": round(rows / process_s, 1)}))


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "worker":
        sys.exit(__doc__)
    worker_main(sys.argv[2], sys.argv[3], sys.argv[5] if sys.argv[4:5] == ["--cprofile"] else None)
