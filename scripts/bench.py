"""Benchmarks of batchinfer against the engine alone and against Ray Data (issue 11).

    python scripts/bench.py            # the full run (~30 min here), writes benchmarks/RESULTS.md
    python scripts/bench.py --quick    # a smaller run of every part, under 10 minutes here
    python scripts/bench.py --size tiny --out /tmp/r.md --json /tmp/r.json   # the test's run

Parts (scripts/benchlib/, one module each; --parts picks some):
  a  cpu_model  the real embedded model on CPU: the engine alone vs batchinfer vs Ray Data
  b  simulated  a simulated L40S: busy fraction, tail and tokens/s vs the engine alone and Ray Data
  c  ceiling    an engine that answers at once: the framework's own rows/s, and its profile
  d  scale      a 1M-row job's driver memory and per-shard cost; planning 10,000 files on S3

Every comparison is measured in one run, back to back, and reported as a ratio: this
machine is shared and noisy. The results (Markdown, with the machine, date, commit and
every setting) go to --out, the raw numbers to --json. Exit 0 when every part ran (a
missed target is reported, not an error), 1 when a part failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.benchlib import common  # noqa: E402

PARTS = {"a": "cpu_model", "b": "simulated", "c": "ceiling", "d": "scale"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="same as --size quick")
    ap.add_argument("--size", choices=common.SIZES, default="full")
    ap.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'bc' (default all)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results.json"))
    ap.add_argument("--workdir", default=None, help="scratch folder (default a temporary one)")
    args = ap.parse_args(argv)
    size = "quick" if args.quick else args.size
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {unknown}; expected letters of {''.join(PARTS)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    started = time.time()
    if size == "tiny":
        # Ray Data 2.60's read_parquet reads the footers with 32 new actors, each its own worker
        # process (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS, read by the driver at each read): 10-40 s
        # before the first batch on 2 cores, in each of the tiny run's three Ray Data runs. Larger
        # sizes keep Ray Data's default, as its users have it, so their Ray Data wall times compare.
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    common.start_ray()
    parts, failures = [], []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for letter in sorted(set(args.parts), key=list(PARTS).index):
            name = PARTS[letter]
            print(f"== part {letter} ({name}), size {size}", flush=True)
            t0 = time.time()
            try:
                module = importlib.import_module(f"scripts.benchlib.{name}")
                part = module.run(size, Path(tmp) / name)
            except Exception:
                failures.append((letter, name, traceback.format_exc()))
                print(failures[-1][2], file=sys.stderr, flush=True)
                continue
            part.seconds = round(time.time() - t0, 1)
            parts.append((letter, part))
            print(f"   part {letter} took {part.seconds:.0f} s", flush=True)
    meta = _meta(size, args, time.time() - started)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(render(meta, parts, failures))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(
        {"meta": meta, "parts": {letter: dataclasses.asdict(p) for letter, p in parts},
         "failures": [{"part": letter, "error": err} for letter, _, err in failures]},
        indent=1, default=str))
    print(f"wrote {args.out} and {args.json} in {time.time() - started:.0f} s", flush=True)
    return 1 if failures else 0


def _meta(size: str, args: argparse.Namespace, seconds: float) -> dict:
    import ray

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    command = "python scripts/bench.py" + (" --quick" if size == "quick" else
                                           "" if size == "full" else f" --size {size}")
    if args.parts != "abcd":
        command += f" --parts {args.parts}"
    return {"command": command, "size": size, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if dirty else ""),
            "machine": common.machine(), "ray": ray.__version__, "seconds": round(seconds, 1)}


def render(meta: dict, parts: list, failures: list) -> str:
    m = meta["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"`{meta['command']}` on {meta['date']}, commit {meta['commit']}; "
        f"{m['machine']} with {m['cpus']} CPUs and {m['memory_gb']} GB, no GPU; Python {m['python']}, "
        f"Ray {meta['ray']}; {meta['seconds'] / 60:.1f} minutes in all.",
        "",
        "Every comparison below was measured in this one run, back to back, and is read as a ratio "
        "(the machine is shared and noisy; absolute numbers move from run to run).",
        "",
    ]
    targets = [(letter, t) for letter, p in parts for t in p.targets]
    if targets:
        lines += ["## Targets (issue 11)", "", "| part | target | measured | bound | met |",
                  "| --- | --- | --- | --- | --- |"]
        for letter, t in targets:
            value = "–" if t.value is None else f"{t.value:,.3g}{t.unit}"
            met = {True: "yes", False: "**no**", None: "–"}[t.met]
            lines.append(f"| {letter} | {t.name} | {value} | {t.op} {t.bound:g}{t.unit} | {met} |")
        lines.append("")
    for letter, part in parts:
        lines += [f"## {letter}. {part.title}", "", f"{part.seconds:.0f} s. Settings:", ""]
        lines += [f"- {key}: {_plain(value)}" for key, value in part.settings.items()]
        lines.append("")
        for table in part.tables:
            lines += [f"**{table.title}**", "", "| " + " | ".join(table.columns) + " |",
                      "| " + " | ".join("---" for _ in table.columns) + " |"]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table.rows]
            lines.append("")
        if part.notes:
            lines += [f"- {note}" for note in part.notes]
            lines.append("")
    for letter, name, error in failures:
        lines += [f"## {letter}. {name}: FAILED", "", "```", error.strip()[-2000:], "```", ""]
    return "\n".join(lines)


def _plain(value) -> str:
    if isinstance(value, dict | list):
        return "`" + json.dumps(value) + "`"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
