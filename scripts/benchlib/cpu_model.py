"""Part a, the real CPU model: SmolLM2-135M (the embedded transformers backend) driven

(i) alone: the same model, batch size and prompts in this process, tokenized with
    batchinfer's PromptBuilder and then run through `generate_batch` over consecutive
    batches: the limit on this machine;
(ii) by `batchinfer run` end to end, 1 and 2 workers;
(iii) by a plain Ray Data pipeline (raydata.py, sync actor: one batch of max_batch_size at
    a time), 1 actor (and 2 in the full run);

back to back in one process. Reported: wall time and steady-state output tokens/s (model
load excluded), each as a ratio to the engine alone measured just before and just after
it (the engine alone runs first, after batchinfer with one worker, and last), so that the
drift of this shared machine shows instead of hiding in the ratio.

Every engine replica runs one torch thread: the engine alone sets it, and workers and Ray
Data actors ask for one CPU each, so Ray sets their OMP_NUM_THREADS=1. On this shared
2-core machine, two-thread torch collapses when other work takes a core (its threads wait
for each other at every step: measured here at 2-14 tokens/s with two threads against
29-60 with one, minutes apart), which no ratio survives; one thread degrades gently.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scripts.benchlib import common, raydata


@dataclass(frozen=True)
class Size:
    rows: int
    max_batch_size: int
    max_tokens: int
    prompt_tokens: int
    workers: tuple[int, ...]
    """batchinfer workers, one run each."""
    actors: tuple[int, ...]
    """Ray Data actors, one run each (Ray Data spends 20-60 s here before its first batch,
    so quick runs it with one actor only)."""


SIZES = {
    "tiny": Size(rows=8, max_batch_size=4, max_tokens=2, prompt_tokens=32, workers=(1,), actors=(1,)),
    "quick": Size(rows=32, max_batch_size=8, max_tokens=16, prompt_tokens=64, workers=(1, 2), actors=(1,)),
    "full": Size(rows=64, max_batch_size=8, max_tokens=24, prompt_tokens=64, workers=(1, 2), actors=(1, 2)),
}
TARGET = 0.97
THREADS = 1
"""torch threads per engine replica (see the module docstring)."""


def run(size: str, workdir: Path) -> common.Part:
    s = SIZES[size]
    started = time.perf_counter()
    workdir = workdir / "cpu_model"
    shutil.rmtree(workdir, ignore_errors=True)
    tok = common.tokenizer()
    prompts = common.shape_prompts(s.rows, s.prompt_tokens, tok=tok)
    # One file per batch, so Ray Data reads one block per batch and spreads them over its
    # actors evenly; batchinfer joins the files into shards of two batches.
    inputs = common.write_prompts(workdir / "prompts", prompts, files=s.rows // s.max_batch_size)

    def cfg(name: str, workers: int) -> dict[str, Any]:
        return common.base_config(
            workdir, name, inputs, engine={"max_batch_size": s.max_batch_size},
            sampling={"max_tokens": s.max_tokens},
            run={"num_workers": workers, "cpus_per_worker": 1, "rows_per_shard": 2 * s.max_batch_size})

    load_before = os.getloadavg()
    engine, builder = _load_engine(cfg("alone", 1))

    def alone() -> dict[str, Any]:
        with _torch_threads(THREADS):
            return {"run": "engine alone", **_engine_alone(engine, builder, inputs, s)}

    # The engine alone runs before and after batchinfer with one worker (the target's pair)
    # and last; each other run is compared with the engine-alone runs on either side of it.
    runs: list[dict[str, Any]] = [alone()]
    for w in sorted(set(s.workers) | set(s.actors)):
        if w in s.workers:
            runs.append({"run": "batchinfer", **run_batchinfer_steady(cfg(f"batchinfer-{w}", w))})
        if w == 1:
            runs.append(alone())
        if w in s.actors:
            runs.append({"run": "Ray Data (sync actor)",
                         **raydata.run_ray_data(cfg(f"raydata-{w}", w), workers=w, style="sync")})
    runs.append(alone())
    engine.shutdown()
    _bracket(runs)

    part = common.Part(
        key="cpu_model", title="Real CPU model (SmolLM2-135M, transformers backend, CPU)",
        settings={"model": "smollm2-135m", "backend": "transformers", **asdict(s),
                  "rows_per_shard": 2 * s.max_batch_size, "input_files": s.rows // s.max_batch_size,
                  "cpus_per_worker": 1, "torch_threads_per_replica": THREADS, "cores": os.cpu_count(),
                  "ray_data_batch_size": s.max_batch_size,
                  "temperature": 0.0},
        raw={"runs": runs, "load_average": [load_before, os.getloadavg()]})
    part.tables.append(_table(runs))
    bi1 = next(r for r in runs if r["run"] == "batchinfer" and r["workers"] == 1)
    part.targets.append(common.Target(
        "Real CPU model: batchinfer steady-state tokens/s ≥ 0.97 × the engine alone (1 worker)",
        bi1["vs_alone"], ">=", TARGET, "×"))
    rd1 = next(r for r in runs if r["run"] == "Ray Data (sync actor)" and r["workers"] == 1)
    part.notes += [*_notes(runs, s.max_tokens), raydata.startup_note(rd1), load_note(load_before)]
    part.seconds = round(time.perf_counter() - started, 1)
    return part


# ---------------------------------------------------------------------- the runs


def _load_engine(cfg_dict: dict[str, Any]):
    from batchinfer.config_loader import config_from_dict
    from batchinfer.engines import get_engine_class
    from batchinfer.prompts import PromptBuilder, load_tokenizer

    config = config_from_dict(cfg_dict)
    engine = get_engine_class(config.engine.backend)(config=config)
    return engine, PromptBuilder(load_tokenizer(config.engine), config.input)


def _engine_alone(engine, builder, inputs: Path, s: Size) -> dict[str, Any]:
    """The engine driven directly: tokenize every prompt, then consecutive batches of
    max_batch_size through generate_batch; only the batches are timed."""
    import pyarrow.parquet as pq

    from batchinfer.engines import Request, row_seed

    table = pq.read_table(str(inputs))
    started = time.perf_counter()
    encoded = builder.encode(table.column("prompt").to_pylist())
    tokenize_s = time.perf_counter() - started
    ids = table.column("id").to_pylist()
    requests = [Request(i, e, row_seed(engine.cfg.sampling.seed, ids[i])) for i, e in enumerate(encoded)]
    tokens = 0
    started = time.perf_counter()
    for b in range(0, len(requests), s.max_batch_size):
        tokens += sum(r.completion_tokens or 0 for r in engine.generate_batch(requests[b:b + s.max_batch_size]))
    generate_s = time.perf_counter() - started
    return {"workers": 1, "total_s": round(tokenize_s + generate_s, 3), "steady_s": round(generate_s, 3),
            "tokenize_s": round(tokenize_s, 3), "rows": len(requests), "output_tokens": tokens,
            "tokens_per_s": round(tokens / generate_s, 2), "rows_per_s": round(len(requests) / generate_s, 3)}


def _bracket(runs: list[dict[str, Any]]) -> None:
    """Set each framework run's `alone_tokens_per_s` (the mean of the engine-alone runs just
    before and after it) and `vs_alone`, its tokens/s over that."""
    marks = [i for i, r in enumerate(runs) if r["run"] == "engine alone"]
    for i, r in enumerate(runs):
        if r["run"] == "engine alone":
            continue
        before = max(m for m in marks if m < i)
        after = min(m for m in marks if m > i)
        r["alone_tokens_per_s"] = round(statistics.mean([runs[before]["tokens_per_s"], runs[after]["tokens_per_s"]]), 2)
        r["vs_alone"] = round(r["tokens_per_s"] / r["alone_tokens_per_s"], 3)


def run_batchinfer_steady(cfg: dict[str, Any]) -> dict[str, Any]:
    """`common.run_batchinfer` plus the steady span: from all workers loaded to the last
    commit. The manifest's generate_s runs on to the manifest, past the actors' shutdown
    and the driver's final checks; the commit records' and manifest's file times (local
    output) give how long that end took, and steady_s leaves it out."""
    out = Path(cfg["output"]["path"])
    shutil.rmtree(out, ignore_errors=True)
    m = common.run_batchinfer(cfg)
    meta = out / "_batchinfer"
    last_commit = max(p.stat().st_mtime for p in (meta / "commits").glob("*.json"))
    end_s = max(0.0, (meta / "manifest.json").stat().st_mtime - last_commit)
    steady_s = max(m["generate_s"] - end_s, 1e-6)
    return {**m, "steady_s": round(steady_s, 3), "after_last_commit_s": round(end_s, 3),
            "manifest_tokens_per_s": m["tokens_per_s"], "manifest_rows_per_s": m["rows_per_s"],
            "tokens_per_s": round(m["output_tokens"] / steady_s, 2), "rows_per_s": round(m["rows"] / steady_s, 3)}


def load_note(before: tuple[float, float, float]) -> str:
    after = os.getloadavg()
    return (f"Load average (1 min) {before[0]:.1f} when the part started and {after[0]:.1f} when it ended, "
            f"on {os.cpu_count()} CPUs: other work shares this machine, and every number here moves with it.")


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """The engine alone with as many torch threads as a worker has (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------- the report


def _table(runs: list[dict[str, Any]]) -> common.Table:
    table = common.Table(
        "Steady-state output tokens/s (model load excluded); each run against the engine-alone runs "
        "just before and after it",
        ["run", "workers", "wall s", "steady s", "rows", "output tokens", "tokens/s", "× engine alone",
         "manifest tokens/s"])
    for r in runs:
        table.rows.append([r["run"], r["workers"], f"{r['total_s']:.1f}",
                           f"{r.get('steady_s', r.get('generate_s', 0)):.2f}", r["rows"], r["output_tokens"],
                           f"{r['tokens_per_s']:.1f}", f"{r['vs_alone']:.3f}" if "vs_alone" in r else "",
                           f"{r['manifest_tokens_per_s']:.1f}" if "manifest_tokens_per_s" in r else ""])
    return table


def _notes(runs: list[dict[str, Any]], max_tokens: int) -> list[str]:
    alone = [r["tokens_per_s"] for r in runs if r["run"] == "engine alone"]
    full = sum(r["output_tokens"] == r["rows"] * max_tokens for r in runs)
    return [
        f"The engine alone ran {', '.join(f'{a:.1f}' for a in alone)} tokens/s in this part, in order: "
        f"{(max(alone) - min(alone)) / statistics.mean(alone):.0%} apart on this shared machine, the noise "
        "floor of every ratio here.",
        "Every replica runs one torch thread. One worker leaves the second core to the framework (its "
        "event loop and threads, Ray, the driver), as a GPU host leaves its CPUs; two workers (or two Ray "
        "Data actors) take both cores for their engines and share them with everything else, so their "
        "ratio to one engine alone is at most 2 and shows that contention as much as scaling.",
        "Steady spans: the engine alone times only its generate_batch calls (tokenizing is not in it); "
        "batchinfer runs from all workers loaded to the last shard committed (reading, templating, "
        "tokenizing, writing and committing are in it; 'manifest tokens/s' also counts the actors' "
        "shutdown and the driver's checks before the manifest); Ray Data runs from its first batch "
        "started to its last batch done (the final block's write is not in it). Wall time includes "
        "Ray start-up of actors, model load and planning.",
        f"Prompts are random one-token words of one length; {full} of {len(runs)} runs had every row run "
        "to max_tokens (the model does not stop early on them), so a full batch is the same work whoever "
        "forms it; batchinfer's static batches are whatever is pending (up to max_batch_size) when the "
        "engine's thread takes one.",
        "Ray Data's actor runs one batch of max_batch_size at a time, as a plain user would write it: Ray "
        "Data fetches the next blocks meanwhile, but the next batch is templated and tokenized in __call__, "
        "after this one is generated.",
    ]
