"""Finding a poison shard's rows by bisection (pure), and the hang watchdog's limit."""

from __future__ import annotations

import pytest

from batchinfer.narrowing import Narrowing
from batchinfer.scheduler import hang_limit


def narrow(rows: int, killers: set[int]) -> tuple[dict[int, str], int]:
    """Run a narrowing where a probe dies iff it holds a killer; (poison rows, probes run)."""
    n, probes = Narrowing(rows), 0
    while not n.done:
        for probe in n.take():
            probes += 1
            if killers & set(probe):
                n.died(probe, f"killed by {sorted(killers & set(probe))}")
            else:
                n.passed(probe)
    return n.poison, probes


@pytest.mark.parametrize(("rows", "killers", "probes"), [
    (5, {2}, 4), (5, {0, 4}, 8), (1, {0}, 1), (1, set(), 1), (8, set(), 2), (16, {15}, 8)])
def test_narrowing_finds_exactly_the_rows_that_kill_alone(rows, killers, probes):
    poison, ran = narrow(rows, killers)
    assert set(poison) == killers
    assert all(poison[k] == f"killed by [{k}]" for k in killers)
    assert ran == probes


def test_narrowing_waits_for_probes_in_flight():
    n = Narrowing(4)
    first, second = n.take()
    assert not n.done and n.take() == []
    n.passed(first)
    assert not n.done
    n.died(second, "boom")
    assert n.take() == [[2], [3]]
    n.passed([2])
    n.died([3], "boom")
    assert n.done and n.poison == {3: "boom"}


@pytest.mark.parametrize(("busy", "limit"), [
    ({}, 15), ({"in_step": False, "step_tokens": 0}, 15), ({"in_step": True, "step_tokens": 100}, 15),
    ({"in_step": True, "step_tokens": 8192 * 16}, 15 * 16), ({"in_step": True, "step_tokens": 12288}, 22.5)])
def test_hang_limit_grows_with_the_prompt_tokens_of_the_step(busy, limit):
    assert hang_limit(15, busy, 8192) == pytest.approx(limit)
    assert hang_limit(15, busy, 0) == 15  # an engine that never reported its context
