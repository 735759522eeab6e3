"""Deterministic sample prompts for the demo, the tests and the benchmarks (not part of the
batchinfer package: a run never needs them).

    python scripts/sample_prompts.py FOLDER [--files 2] [--rows-per-file 100] [--row-group-size 25]

Tests and scripts import it from the repository root: `from scripts.sample_prompts import ...`.
"""

from __future__ import annotations

import argparse
import os

import pyarrow as pa
import pyarrow.parquet as pq

TOPICS = ["the ocean", "volcanoes", "honeybees", "the moon", "bread", "rainforests", "glaciers",
          "owls", "electric cars", "chess", "coffee", "the printing press", "tides", "bicycles",
          "penguins", "thunderstorms", "libraries", "tomatoes", "satellites", "deserts"]
TEMPLATES = [
    "Write one sentence about {topic}.",
    "Give me a fun fact about {topic}.",
    "Explain {topic} to a child in two sentences.",
    "What is {a} plus {b}? Answer with the number only.",
    "Name three words that rhyme with '{word}'.",
]
WORDS = ["cat", "light", "tree", "blue", "sing", "rain", "stone", "day"]


def prompt(i: int) -> str:
    template = TEMPLATES[i % len(TEMPLATES)]
    return template.format(topic=TOPICS[(i // len(TEMPLATES)) % len(TOPICS)], a=i % 17, b=i % 5 + 3,
                           word=WORDS[i % len(WORDS)])


def write_sample_prompts(folder: str, *, files: int = 2, rows_per_file: int = 100,
                         row_group_size: int = 25, start: int = 0) -> list[str]:
    """Write `files` Parquet files of prompts with columns id, prompt, category; return paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for f in range(files):
        ids = range(start + f * rows_per_file, start + (f + 1) * rows_per_file)
        table = pa.table({
            "id": [f"q{i:06d}" for i in ids],
            "prompt": [prompt(i) for i in ids],
            "category": [TEMPLATES[i % len(TEMPLATES)].split(" ")[0].lower() for i in ids],
        })
        path = os.path.join(folder, f"prompts-{f:03d}.parquet")
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="Write Parquet files of sample prompts (id, prompt, category).")
    parser.add_argument("folder")
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--rows-per-file", type=int, default=100)
    parser.add_argument("--row-group-size", type=int, default=25)
    args = parser.parse_args()
    write_sample_prompts(args.folder, files=args.files, rows_per_file=args.rows_per_file,
                         row_group_size=args.row_group_size)


if __name__ == "__main__":
    main()
