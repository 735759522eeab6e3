"""What the benchmark parts share.

Every part is a module with `run(size, workdir) -> Part`: `size` is "tiny" (the test that
keeps the script from rotting: seconds, numbers meaningless), "quick" (the whole script in
under 10 minutes here) or "full". A part measures every comparison in one process, one Ray
cluster, back to back, and reports ratios: this machine is shared and noisy, so absolute
numbers mean little and ratios measured minutes apart mean much more.
"""

from __future__ import annotations

import functools
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
SIZES = ("tiny", "quick", "full")
RAY_CPUS = 16
"""Logical CPUs the benchmark's local Ray offers: 8 workers, Ray Data's actors and its read
and write tasks must all fit (the machine has fewer real cores; they share them)."""
WORKER_ENV = {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------------- results


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)


@dataclass
class Target:
    """One of the issue's targets: `value` compared with `bound` (`>=` or `<=`)."""

    name: str
    value: float | None
    op: str
    bound: float
    unit: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.bound if self.op == ">=" else self.value <= self.bound


@dataclass
class Part:
    """What a part returns: tables for RESULTS.md, the targets it checks, the settings it
    ran with, free-text notes, and its raw measurements (into the JSON only)."""

    key: str
    title: str
    settings: dict[str, Any]
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# ---------------------------------------------------------------------- Ray and batchinfer


def start_ray(num_cpus: int = RAY_CPUS) -> None:
    """One local Ray for the whole benchmark; batchinfer's runner uses it when it is up."""
    import ray

    if not ray.is_initialized():
        # No prestarted idle workers: on 2 cores, 16 of them starting compete with the runs.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": WORKER_ENV},
                 _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False})
        try:  # Ray Data prints a progress bar per operator; the tables are the report
            from ray.data import DataContext

            ctx = DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
        except (ImportError, AttributeError):
            pass


def run_batchinfer(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one job in this process (on the benchmark's Ray) and return its measurements:
    wall_s (from the first shard handed out to the manifest: engines are loaded, so this is
    generation time), rows, output_tokens, output tokens/s, tail_s and each worker's engine
    accounting (`this_run.engines`)."""
    from batchinfer import runner
    from batchinfer.config_loader import config_from_dict

    config = config_from_dict(cfg)
    started = time.perf_counter()
    report = runner.run(config, progress=False, install_signal_handlers=False)
    total_s = time.perf_counter() - started
    m = report.manifest
    if report.status != "completed" or m.rows.ok != m.rows.total:
        raise RuntimeError(f"benchmark job ended {report.status}: {m.rows}")
    this = m.this_run
    return {"total_s": round(total_s, 3), "generate_s": this.generate_s, "rows": this.rows,
            "output_tokens": this.completion_tokens, "tokens_per_s": this.tokens_per_s,
            "rows_per_s": this.rows_per_s, "workers": this.workers, "tail_s": getattr(this, "tail_s", None),
            "engines": [dict(e) for e in getattr(this, "engines", [])]}


def base_config(workdir: Path, name: str, inputs: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A run config writing to workdir/runs/name; `sections` are merged over the defaults."""
    cfg: dict[str, Any] = {
        "input": {"path": str(inputs), "id_column": "id"},
        "output": {"path": str(workdir / "runs" / name), "compression": "snappy"},
        "engine": {},
        "sampling": {},
        "run": {"cpus_per_worker": 1},
    }
    for key, values in sections.items():
        cfg[key] = {**cfg.get(key, {}), **values}
    return cfg


# ---------------------------------------------------------------------- workloads


@functools.cache
def tokenizer():
    """The embedded model's tokenizer (SmolLM2): every backend here tokenizes with it. Loaded
    once per process (every part asks for it; none changes it)."""
    from batchinfer.config import EngineConfig
    from batchinfer.prompts import load_tokenizer

    return load_tokenizer(EngineConfig())


def one_token_words(tok, count: int = 400) -> list[str]:
    """Words that are exactly one token with a leading space, so a prompt of n of them is n
    tokens (plus the chat template's own)."""
    candidates = ("time year people way day man thing woman life child world school state family "
                  "student group country problem hand part place case week company system program "
                  "question work government number night point home water room mother area money "
                  "story fact month lot right study book eye job word business issue side kind head "
                  "house service friend father power hour game line end member law car city name "
                  "team minute idea kid body back parent face others level office door health person "
                  "art war history party result change morning reason research girl guy moment air "
                  "teacher force education foot boy age policy process music market sense nation "
                  "plan college interest death experience effect use class control care field "
                  "development role effort rate heart drug show leader light voice wife police mind "
                  "price report decision son view relationship town road arm difference value "
                  "building action model season society tax director position player record paper "
                  "space ground form event official matter center couple site project activity star "
                  "table need court oil situation cost industry figure street image phone data "
                  "picture practice piece land product doctor wall patient worker news test movie "
                  "north love support technology step baby computer type attention film tree source "
                  "organization hair window evidence population site bank color fire sun river "
                  "rain stone cat dog bird fish horse ship boat train bread milk salt gold iron").split()
    words = []
    for w in dict.fromkeys(candidates):
        if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1:
            words.append(w)
        if len(words) >= count:
            break
    return words


def template_overhead(tok) -> int:
    """Tokens the chat template adds around a one-word user prompt, less that word."""
    return len(prompt_ids(tok, ["time"])[0]) - 1


def prompt_ids(tok, prompts: list[str]) -> list[list[int]]:
    """The token ids batchinfer sends the engine for each of `prompts` (its PromptBuilder,
    defaults), in one batch."""
    from batchinfer.config import InputConfig
    from batchinfer.prompts import PromptBuilder

    return PromptBuilder(tok, InputConfig()).encode(prompts)


def write_prompts(folder: Path, prompts: list[str], *, files: int = 1, row_group_size: int = 512,
                  start: int = 0, whole_groups: bool = False) -> Path:
    """Write `prompts` as Parquet (columns id, prompt) over `files` files; return the folder.
    With `whole_groups`, each file holds a whole number of row groups (so shards of a
    multiple of `row_group_size` rows come out even), in as many files as that takes."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(prompts) // files)
    if whole_groups:
        per = -(-per // row_group_size) * row_group_size
    for f in range(files):
        chunk = prompts[f * per:(f + 1) * per]
        if not chunk:
            break
        ids = [f"r{start + f * per + i:08d}" for i in range(len(chunk))]
        pq.write_table(pa.table({"id": ids, "prompt": chunk}), str(folder / f"part-{f:05d}.parquet"),
                       row_group_size=row_group_size)
    return folder


def shape_prompts(rows: int, input_tokens: int, *, seed: int = 0, tok=None) -> list[str]:
    """`rows` prompts of `input_tokens` tokens each once the chat template is applied
    (random one-token words, so no two prompts share a prefix beyond the template's)."""
    tok = tok or tokenizer()
    words = one_token_words(tok)
    n = max(1, input_tokens - template_overhead(tok))
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(n)) for _ in range(rows)]


def mixed_prompts(rows: int, *, low: int = 32, high: int = 2048, seed: int = 1, tok=None) -> list[str]:
    """Prompt lengths drawn uniformly from [low, high] tokens (template included)."""
    tok = tok or tokenizer()
    words, overhead = one_token_words(tok), template_overhead(tok)
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(max(1, rng.randint(low, high) - overhead)))
            for _ in range(rows)]


def few_shot_prompts(rows: int, *, prefixes: int = 8, prefix_tokens: int = 1500,
                     question_tokens: int = 40, seed: int = 2, tok=None) -> list[str]:
    """`prefixes` long few-shot blocks, each shared by about rows/prefixes rows, followed by
    a row's own question; rows are shuffled, so neighbours rarely share a block (as when a
    nightly job concatenates several tasks' prompts)."""
    tok = tok or tokenizer()
    words = one_token_words(tok)
    rng = random.Random(seed)
    blocks = [" ".join(rng.choice(words) for _ in range(prefix_tokens)) for _ in range(prefixes)]
    out = [f"{blocks[i % prefixes]} question {' '.join(rng.choice(words) for _ in range(question_tokens))}"
           for i in range(rows)]
    rng.shuffle(out)
    return out


def machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
