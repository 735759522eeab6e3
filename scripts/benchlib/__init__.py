"""The parts of `scripts/bench.py` (issue 11, item 2), one module each; `common` holds what
they share: Ray start-up, workloads of known token shapes, running batchinfer and reading
its manifest, and the result record every part returns."""
