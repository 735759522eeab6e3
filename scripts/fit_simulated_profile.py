"""Fit a simulated-engine profile's four iteration-time coefficients to published throughput.

    python scripts/fit_simulated_profile.py [PROFILE]

The simulator's schedule never depends on durations, so each shape's virtual time is the dot
product of the coefficients with four sums the simulator counts (iterations, prompt tokens
computed, sequence-steps, context tokens attended). Published throughput gives each shape's
time; least squares on relative error (non-negative coefficients) fits them. Paste the
printed coefficients into batchinfer/engines/simulated/profiles.py.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from batchinfer.engines.simulated.model import Simulator, drive, saturated_throughput
from batchinfer.engines.simulated.profiles import CALIBRATION_REQUESTS, PROFILES, PUBLISHED

NAMES = ("base_s", "prefill_s_per_token", "decode_s_per_seq", "attn_s_per_ctx_token")


def terms(profile, input_len: int, output_len: int, n: int) -> list[int]:
    sim = Simulator(profile)
    for i in range(n):
        sim.submit(i, input_len, output_len)
    drive(sim)
    return list(sim.counters.terms())


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0 by dropping the most negative coefficient until none is (4 unknowns)."""
    active = list(range(a.shape[1]))
    while True:
        x = np.zeros(a.shape[1])
        x[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if (x >= 0).all():
            return x
        active.remove(min(active, key=lambda j: x[j]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", nargs="?", default="l40s-llama-3.1-8b-fp8")
    args = parser.parse_args()
    profile, published = PROFILES[args.profile], PUBLISHED[args.profile]
    n = CALIBRATION_REQUESTS
    shapes = list(published)
    x = np.array([terms(profile, i, o, n) for i, o in shapes], dtype=float)
    seconds = np.array([n * o / published[i, o] for i, o in shapes])
    coef = nnls(x / seconds[:, None], np.ones(len(shapes)))
    fitted = dataclasses.replace(profile, **{k: float(f"{v:.4g}") for k, v in zip(NAMES, coef, strict=True)})
    for k in NAMES:
        print(f"{k}={getattr(fitted, k)!r},")
    print("input/output  simulated  published  ratio")
    for i, o in shapes:
        sim = saturated_throughput(fitted, i, o, n)
        print(f"{i:>5}/{o:<6} {sim:>10.0f} {published[i, o]:>10} {sim / published[i, o]:>6.3f}")


if __name__ == "__main__":
    main()
