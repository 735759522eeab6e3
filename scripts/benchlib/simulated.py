"""Part b: does batchinfer keep a simulated L40S busy?

The simulated engine (engines/simulated, profile l40s-llama-3.1-8b-fp8) runs Llama-3.1-8B
FP8 in-flight batching in modelled time, `speed` times faster than real time. Compared in
one run, per workload:

- *direct*: the engine alone in this process, every request submitted at once (the limit:
  its batch is full from the first iteration to the drain at the end);
- *batchinfer* with 1, 4 and 8 workers (`batchinfer run`, one engine per worker);
- *Ray Data*: read_parquet -> map_batches(async actor around the same engine, several
  batches in flight per actor, as Ray Data LLM drives vLLM) -> write_parquet.

Reported: output tokens/s per worker, the engine's busy fraction (1 - starved/wall per
worker, from its first request to the last shard handed out) and the tail (from the last
shard handed out to the last commit). A headroom sweep raises `speed` on one worker until
the framework, not the engine, is the limit.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.benchlib import common

PROFILE = "l40s-llama-3.1-8b-fp8"
MAX_BATCH = 256
"""The profile's calibration setting (trtllm-bench's max_batch_size for these tables)."""


def engine_section(speed: float, **options: Any) -> dict[str, Any]:
    return {"backend": "simulated", "max_batch_size": MAX_BATCH,
            "options": {"profile": PROFILE, "speed": speed, **options}}


def direct(cfg: dict[str, Any], prompts: list[str]) -> dict[str, Any]:
    """The engine alone: every request submitted at once, in this process; wall time from
    the first submission to the last result (tokenizing is done before, untimed)."""
    from batchinfer.config_loader import config_from_dict
    from batchinfer.engines import Request, row_seed
    from batchinfer.engines.simulated.engine import SimulatedEngine

    config = config_from_dict({k: v for k, v in cfg.items() if k in ("engine", "sampling")})
    tok = common.tokenizer()
    from batchinfer.prompts import PromptBuilder

    ids = PromptBuilder(tok, config.input).encode(prompts)
    engine = SimulatedEngine(config=config)

    async def go() -> list:
        reqs = [Request(i, p, row_seed(config.sampling.seed, f"r{i:08d}")) for i, p in enumerate(ids)]
        return await asyncio.gather(*(engine.generate(r) for r in reqs))

    try:
        started = time.perf_counter()
        results = asyncio.run(go())
        wall = time.perf_counter() - started
        acct = engine.stats()
    finally:
        engine.shutdown()
    tokens = sum(r.completion_tokens for r in results)
    return {"generate_s": round(wall, 3), "rows": len(results), "output_tokens": tokens,
            "tokens_per_s": tokens / wall, "workers": 1, "tail_s": None, "engines": [acct]}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per-worker output tokens/s, mean and min engine busy fraction, the tail."""
    engines = result.get("engines") or []
    busy = [e["busy_fraction"] for e in engines if e.get("wall_s")]
    return {"tok_s_per_worker": result["tokens_per_s"] / max(1, result["workers"]),
            "busy_mean": statistics.fmean(busy) if busy else None,
            "busy_min": min(busy) if busy else None, "tail_s": result.get("tail_s"),
            "generate_s": result["generate_s"], "rows": result["rows"], "reused": _reused(result)}


# ---------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    name: str
    max_tokens: int
    output_lengths: str = "max_tokens"

    def prompts(self, rows: int, tok) -> list[str]:
        if self.name == "128/128":
            return common.shape_prompts(rows, 128, tok=tok)
        if self.name == "2048/128":
            return common.shape_prompts(rows, 2048, tok=tok)
        if self.name == "mixed":
            return common.mixed_prompts(rows, low=32, high=2048, tok=tok)
        if self.name == "few-shot":
            return common.few_shot_prompts(rows, prefixes=max(4, rows // 64), prefix_tokens=1500,
                                           question_tokens=40, tok=tok)
        raise ValueError(f"unknown workload {self.name!r}")


WORKLOADS = {
    "128/128": Workload("128/128", 128),
    "2048/128": Workload("2048/128", 128),
    "mixed": Workload("mixed", 512, "seeded"),  # prompts 32-2048 tokens, outputs 1-512 (seeded)
    "few-shot": Workload("few-shot", 64),  # 1,500-token examples shared by 64 rows each
}


def rows_per_second(workload: Workload, prompts: list[str], tok) -> float:
    """The engine's saturated rows/s on this workload at speed 1, simulated in virtual time
    (milliseconds), to size each run to a wanted duration."""
    from batchinfer.engines.simulated import profiles
    from batchinfer.engines.simulated.model import Simulator, drive

    sim = Simulator(profiles.get(PROFILE), max_batch_size=MAX_BATCH)
    sample = prompts[:512]
    for i, ids in enumerate(common.prompt_ids(tok, sample)):
        out = workload.max_tokens if workload.output_lengths == "max_tokens" else workload.max_tokens // 2
        sim.submit(i, len(ids), out, ids)
    return len(sample) / drive(sim)


# ---------------------------------------------------------------------- the part

SIZES = {
    # shards of engine work per worker (full: 8, so that at 4 workers the plan is big
    # enough for plan.taper_end to cut its last shards, as a night's plan is); worker counts
    # on 128/128; other workloads and their worker counts; Ray Data on the other workloads
    # too; headroom speeds (one worker, 128/128)
    "tiny": {"shards": 2, "speed": 20.0, "workers": [1], "others": {"few-shot": [1]},
             "ray_data_others": False, "headroom": [20.0]},  # headroom reuses the 128/128 runs
    "quick": {"shards": 4, "speed": 1.0, "workers": [4], "others": {}, "ray_data_others": False,
              "headroom": [10.0]},
    "full": {"shards": 8, "speed": 1.0, "workers": [1, 4, 8], "others": {w: [4] for w in
             ("2048/128", "mixed", "few-shot")}, "ray_data_others": True, "headroom": [10.0, 20.0, 40.0]},
}
PRESSURE_KV_TOKENS = 40_000
"""A KV cache that holds about 25 of the few-shot workload's 1,540-token prompts (the
profile's is 500,000 tokens, which holds every shared prefix of the workload at once)."""
PRESSURE_SPEED = 2.0
SHARD_ROWS = 512
"""run.rows_per_shard's default: 128/128 runs with it (a shard is ~7 s of an L40S's work)."""
SHARD_SECONDS = 7.0
"""Other workloads get shards of about as much engine work (at least 64 rows)."""


class Bench:
    def __init__(self, size: str, workdir: Path):
        self.size, self.plan, self.workdir = size, SIZES[size], workdir
        self.tok = common.tokenizer()
        self.raw: dict[str, Any] = {}
        self._inputs: dict[tuple[str, int], tuple[Path, list[str], float]] = {}

    def inputs(self, workload: Workload, rows: int) -> tuple[Path, list[str], float]:
        """The input folder, its prompts and the engine's rows/s on them, each made once (the
        rate's simulation tokenizes up to 512 prompts, seconds on few-shot)."""
        key = (workload.name, rows)
        if key not in self._inputs:
            prompts = workload.prompts(rows, self.tok)
            folder = self.workdir / "inputs" / f"{workload.name.replace('/', '-')}-{rows}"
            if not folder.exists():
                common.write_prompts(folder, prompts, files=FILES, row_group_size=64, whole_groups=True)
            self._inputs[key] = folder, prompts, rows_per_second(workload, prompts, self.tok)
        return self._inputs[key]

    def config(self, workload: Workload, name: str, inputs: Path, speed: float, workers: int,
               rows_per_shard: int, **run: Any) -> dict[str, Any]:
        return common.base_config(
            self.workdir, name, inputs,
            engine=engine_section(speed, output_lengths=workload.output_lengths),
            sampling={"max_tokens": workload.max_tokens},
            run={"num_workers": workers, "rows_per_shard": rows_per_shard, "cpus_per_worker": 1, **run})

    def sizes(self, workload: Workload, speed: float) -> tuple[float, int, int]:
        """The engine's rows/s at `speed`, rows per worker, rows per shard."""
        _, _, rate = self.inputs(workload, 512)
        rate *= speed
        # Whole row groups of 64, so every worker gets the same number of equal shards.
        shard = SHARD_ROWS if workload.name == "128/128" else 64 * max(1, round(rate / speed * SHARD_SECONDS / 64))
        if self.size == "tiny":
            shard = 64
        return rate, shard * self.plan["shards"], shard

    def compare(self, workload: Workload, workers: list[int], ray_data: bool, speed: float) -> list[dict]:
        """The engine alone, then batchinfer (and Ray Data) at each worker count, on one
        workload, each worker given the same seconds of engine work."""
        rate, per_worker, shard_rows = self.sizes(workload, speed)
        # The engine alone gets one worker's share of the biggest input: on the few-shot
        # workload each engine then sees as many rows per shared prefix as a worker does.
        folder, prompts, _ = self.inputs(workload, per_worker * max(workers))
        # A run this part has measured already (the same workload, workers and speed: tiny's
        # headroom is at its speed) is reused; run again, it would resume its finished output.
        key = f"direct {workload.name} x{speed:g}"
        d = self.raw.get(key) or direct(self.config(workload, "direct", folder, speed, 1, shard_rows),
                                        prompts[:per_worker])
        out = [{"workload": workload.name, "runner": "engine alone", "workers": 1, **summarize(d)}]
        self.raw[key] = d
        for n in workers:
            folder, _, _ = self.inputs(workload, per_worker * n)
            tag = f"{workload.name.replace('/', '-')}-{n}-x{speed:g}"
            r = self.raw.get(f"batchinfer {tag}") or common.run_batchinfer(
                self.config(workload, f"bi-{tag}", folder, speed, n, shard_rows))
            row = {"workload": workload.name, "runner": "batchinfer", "workers": n, **summarize(r),
                   "vs_direct": r["tokens_per_s"] / n / d["tokens_per_s"], "shard_s": shard_rows / rate}
            out.append(row)
            self.raw[f"batchinfer {tag}"] = r
            if workload.name == "few-shot" and n == max(workers):
                out += self.prefix_order(workload, per_worker, shard_rows)
            if ray_data:
                from scripts.benchlib import raydata

                rd = raydata.run_ray_data(self.config(workload, f"rd-{tag}", folder, speed, n, shard_rows),
                                          workers=n, style="async", blocks=max(FILES, 4 * n))
                out.append({"workload": workload.name, "runner": "Ray Data (async actor)", "workers": n,
                            **summarize(rd), "vs_direct": rd["tokens_per_s"] / n / d["tokens_per_s"]})
                row["vs_ray_data"] = r["tokens_per_s"] / max(rd["tokens_per_s"], 1e-9)
                self.raw[f"ray data {tag}"] = rd
        return out

    def prefix_order(self, workload: Workload, rows: int, shard_rows: int) -> list[dict]:
        """What run.prefix_order buys: one worker on the few-shot workload with a KV cache of
        PRESSURE_KV_TOKENS (a bigger model's, or longer contexts'), rows sorted by prompt
        against rows in input order, at PRESSURE_SPEED."""
        folder, _, rate = self.inputs(workload, rows)
        out = []
        for on in (True, False):
            cfg = self.config(workload, f"bi-prefix-{'on' if on else 'off'}", folder, PRESSURE_SPEED, 1,
                              shard_rows, prefix_order=on)
            cfg["engine"]["options"]["kv_cache_tokens"] = PRESSURE_KV_TOKENS
            r = common.run_batchinfer(cfg)
            self.raw[f"batchinfer few-shot prefix_order {on} kv {PRESSURE_KV_TOKENS}"] = r
            out.append({"workload": f"few-shot, KV cache {PRESSURE_KV_TOKENS // 1000}k tokens, x{PRESSURE_SPEED:g}",
                        "runner": f"batchinfer, prefix_order {'on' if on else 'off'}", "workers": 1,
                        **summarize(r), "shard_s": shard_rows / (rate * PRESSURE_SPEED)})
        out[0]["vs_off"] = out[0]["tok_s_per_worker"] / out[1]["tok_s_per_worker"]
        return out

    def headroom(self, speeds: list[float]) -> list[dict]:
        """One worker on 128/128 at rising speeds: its busy fraction, and its rate against
        the engine alone at the same speed."""
        out = []
        for speed in speeds:
            rows = self.compare(WORKLOADS["128/128"], [1], False, speed)
            bi = rows[-1]
            out.append({"speed": speed, "rows_per_s": bi["rows"] / bi["generate_s"],
                        "tok_s": bi["tok_s_per_worker"], "vs_direct": bi["vs_direct"],
                        "busy_min": bi["busy_min"], "tail_s": bi["tail_s"]})
        return out


def _reused(result: dict[str, Any]) -> float | None:
    """The share of prompt tokens the engines took from their KV cache (prefix block reuse)."""
    engines = result.get("engines") or []
    prompt = sum(e.get("prompt_tokens", 0) for e in engines)
    return sum(e.get("reused_tokens", 0) for e in engines) / prompt if prompt else None


FILES = 16
"""Input files per workload (Ray Data reads one block per file by default)."""

COLUMNS = ["workload", "runner", "workers", "output tok/s per worker", "vs engine alone", "vs Ray Data",
           "engine busy (mean / min)", "tail s (shard s)", "prompt tokens from KV cache", "rows", "generate s"]


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def _row(r: dict) -> list:
    tail = "–" if r.get("tail_s") is None else f"{r['tail_s']:.1f} ({r.get('shard_s', 0):.1f})"
    return [r["workload"], r["runner"], r["workers"], f"{r['tok_s_per_worker']:,.0f}", _fmt(r.get("vs_direct"), ".3f"),
            _fmt(r.get("vs_ray_data"), ".2f"), f"{_fmt(r['busy_mean'])} / {_fmt(r['busy_min'])}", tail,
            _fmt(r.get("reused"), ".1%"), r["rows"], f"{r['generate_s']:.1f}"]


def run(size: str, workdir: Path) -> common.Part:
    plan = SIZES[size]
    bench = Bench(size, workdir)
    speed = plan["speed"]
    rows = bench.compare(WORKLOADS["128/128"], plan["workers"], True, speed)
    for name, counts in plan["others"].items():
        rows += bench.compare(WORKLOADS[name], counts, plan["ray_data_others"], speed)
    room = bench.headroom(plan["headroom"])
    part = common.Part(
        key="simulated", title="Simulated L40S (Llama-3.1-8B FP8, TensorRT-LLM in-flight batching)",
        settings={"profile": PROFILE, "engine.max_batch_size": MAX_BATCH, "speed": speed,
                  "shards of work per worker (the job's size; run.shards_per_worker is left automatic)": plan["shards"],
                  "rows per shard": f"{SHARD_ROWS} on 128/128, else {SHARD_SECONDS:g} s of engine work "
                                    "(in whole row groups of 64)",
                  "workloads": {w.name: {"max_tokens": w.max_tokens, "output_lengths": w.output_lengths}
                                for w in WORKLOADS.values()},
                  "Ray Data": "read_parquet -> map_batches(async actor, batch 64, ~2 x max_batch_size in flight) "
                              "-> write_parquet"})
    part.tables.append(common.Table("Output tokens/s per worker, engine busy fraction and the tail", COLUMNS,
                                    [_row(r) for r in rows]))
    part.tables.append(common.Table(
        "Headroom: one worker, 128/128, the engine run faster than an L40S",
        ["speed (x one L40S)", "rows/s", "output tok/s", "vs engine alone", "engine busy", "tail s"],
        [[f"{h['speed']:g}", f"{h['rows_per_s']:,.0f}", f"{h['tok_s']:,.0f}", _fmt(h["vs_direct"]),
          _fmt(h["busy_min"]), _fmt(h["tail_s"], ".1f")] for h in room]))
    _targets(part, rows, room, speed)
    part.raw = {"rows": rows, "headroom": room, **bench.raw}
    part.notes += [
        "The engine alone is one in-process engine with every request submitted at once: its batch "
        "is full from the first iteration, then drains; the ratio compares whole runs including that drain.",
        "Busy = 1 - (starved + idle) / wall per engine, from its first request to the last shard "
        "handed out; an iteration whose prompt chunks fill max_num_tokens counts as busy.",
        "The tail is from the last shard handed out to the last commit; in brackets, one shard's "
        "duration (its rows at the engine's rate).",
        "No GPU was used: the engine's timing is the profile fitted to NVIDIA's published figures; "
        "what it shows is whether the framework keeps such an engine fed on this 2-core machine.",
        "On few-shot with several workers, each engine sees a quarter of each shared prefix's rows "
        "(shards follow input order, not prefixes); the engine alone is given one worker's share of "
        "the same input, so it sees them as thinly.",
    ]
    for on, off in zip(rows, rows[1:], strict=False):
        if "vs_off" in on:
            part.notes.append(
                f"run.prefix_order: with a KV cache of {PRESSURE_KV_TOKENS:,} tokens, rows sorted by prompt ran "
                f"{on['vs_off']:.2f}x the output tokens/s of rows in input order ({_fmt(on['reused'], '.1%')} "
                f"vs {_fmt(off['reused'], '.1%')} of prompt tokens from the cache), one worker at "
                f"{PRESSURE_SPEED:g}x an L40S; the few-shot rows above have the profile's 500,000-token "
                "cache, which keeps every prefix of the workload. The "
                "simulated engine offers a prompt's blocks for reuse from its admission; TensorRT-LLM "
                "offers them as they are filled, so two requests with one prefix admitted in the same "
                "iteration both compute it there, which sorting makes more likely.")
    return part


def _targets(part: common.Part, rows: list[dict], room: list[dict], speed: float) -> None:
    for r in rows:
        n = r["workers"]
        if r["runner"] != "batchinfer" or speed != 1.0 or n not in (4, 8):
            continue
        name = f"{r['workload']}, {n} workers"
        part.targets.append(common.Target(f"{name}: engine busy (min) outside the tail", r["busy_min"], ">=", 0.99))
        part.targets.append(common.Target(f"{name}: tail in shard durations",
                                          r["tail_s"] / r["shard_s"] if r.get("tail_s") is not None else None,
                                          "<=", 1.0))
        part.targets.append(common.Target(f"{name}: output tok/s vs engine alone", r["vs_direct"], ">=", 0.97))
        if "vs_ray_data" in r:
            part.targets.append(common.Target(f"{name}: output tok/s vs Ray Data", r["vs_ray_data"], ">=", 1.10))
    busy_enough = [h["speed"] for h in room if h["busy_min"] is not None and h["busy_min"] >= 0.99]
    part.targets.append(common.Target("Headroom: highest speed with one engine >= 0.99 busy (x one L40S)",
                                      max(busy_enough) if busy_enough else 0.0, ">=", 10.0))
