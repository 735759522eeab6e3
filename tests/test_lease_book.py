"""The scheduler's lease book, driven without Ray: made-up workers, a made-up clock.

The cases tests/test_faults.py runs end to end, as the book sees them:
- a worker killed mid-shard: its shards come back, alone on a worker, as attempt 2;
- an engine that hangs: the watchdog replaces its worker and the shards are retried; a
  long prefill (big step_tokens, or heartbeats from the decoder layers) is not a hang;
- a row that kills its worker, in a shard or alone in a one-row shard: narrowed to row
  errors, and the innocent neighbours commit;
- a straggler raced by an idle worker: the first commit wins, the other copy is cancelled
  and its late result ignored;
- a shard that always fails: failed after max_attempts (a partial run), the others commit;
- a stop (SIGTERM): nothing new is handed out, shards in flight get the grace period.

Not here, because the book never sees them: a row the engine fails on (engine_error) and a
request past its deadline are row errors inside a shard that commits (worker and engine
level, tests/test_worker.py and tests/test_faults.py); an engine restarted in place is the
worker's own business (the shard returns normally, attempt 1). Driver kills are a matter of
the run directory (tests/test_exactly_once.py, tests/test_faults.py).

Then property tests: random sequences of leases, commits, errors, deaths, hangs, time and
stops keep the book's promises.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from batchinfer.lease_book import (
    Cancel,
    Commit,
    Fail,
    GiveUp,
    Lease,
    LeaseBook,
    Narrow,
    Poisoned,
    Race,
    Replace,
    Retry,
    Rules,
    Start,
    hang_limit,
)
from batchinfer.records import ShardSummary


def make_book(shards: int = 4, *, slots: int = 1, rows: int = 5, now: float = 0.0, **rules) -> LeaseBook:
    return LeaseBook(rules=Rules(**rules), rows=[rows] * shards, pending=range(shards),
                     slots=slots, now=now)


def started(decisions) -> list[Lease]:
    return [d.lease for d in decisions if isinstance(d, (Start, Race))]


class Summary(ShardSummary):
    """A shard summary that also says which rows its attempt was told to skip."""

    skip: dict[int, str] | None = None


def summary(lease: Lease, generate_s: float = 1.0) -> Summary:
    return Summary(shard=lease.shard, part=f"part-{lease.shard:06d}.parquet", attempt=lease.attempt,
                   worker=lease.slot, generate_s=generate_s, rows=1, rows_ok=1, rows_failed=0,
                   prompt_tokens=1, completion_tokens=1, committed_at="2026-11-29T00:00:00+00:00",
                   skip=lease.skip)


def of(kind, decisions) -> list:
    return [d for d in decisions if isinstance(d, kind)]


def runs(book: LeaseBook, lease: Lease) -> set[int]:
    """The shard rows a lease runs on its worker."""
    if lease.probe is not None:
        return set(lease.probe)
    return set(range(book.rows[lease.shard])) - set(lease.skip or {})


def play(book: LeaseBook, killers: dict[int, set[int]], *, rounds: int = 100) -> list:
    """Run the book to the end with workers that die (all their leases with them) whenever
    one of their leases runs a killer row; every other lease commits. All decisions made."""
    made, now = [], 0.0
    for _ in range(rounds):
        if not book.unfinished:
            return made
        made += book.fill(now) + book.speculate(now)
        for slot in book.slots:
            held = book.held(slot.index)
            deadly = [k for lease in held for k in runs(book, lease) & killers.get(lease.shard, set())]
            for lease in held:
                if deadly:
                    made += book.died(lease.id, f"killed by row {deadly[0]}", now)
                else:
                    made += book.succeeded(lease.id, None if lease.probe else summary(lease))
            if not slot.ready:
                book.ready(slot.index, now)
        now += 1.0
    raise AssertionError(f"not done after {rounds} rounds")


# --------------------------------------------------------------------------- handing out


def test_workers_pull_up_to_shards_per_worker_and_refill_as_shards_commit():
    book = make_book(5, slots=2, shards_per_worker=2)
    first = started(book.fill(0))
    assert [(lease.shard, lease.slot, lease.attempt) for lease in first] == [  # one each per round
        (0, 0, 1), (1, 1, 1), (2, 0, 1), (3, 1, 1)]
    assert book.fill(0) == []  # everyone is full
    assert of(Commit, book.succeeded(first[1].id, summary(first[1])))
    assert [(lease.shard, lease.slot) for lease in started(book.fill(1))] == [(4, 1)]
    for lease in list(book.leases.values()):
        book.succeeded(lease.id, summary(lease))
    assert not book.unfinished and sorted(book.committed) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- deaths and hangs


def test_worker_killed_mid_shard_its_shards_are_leased_again_alone_as_attempt_2():
    book = make_book(4, slots=2, shards_per_worker=2)
    a, c, b, d = started(book.fill(0))  # a and b on worker 0, c and d on worker 1
    died = book.died(a.id, "ActorDiedError: SIGKILL", 5)
    assert of(Replace, died) == [Replace(0, "died", True, 1)]
    assert of(Retry, died) == [Retry(0, 1, "worker 0 died: ActorDiedError: SIGKILL")]
    # Its other shard reports next: the slot is replaced once, not twice.
    assert not of(Replace, book.died(b.id, "ActorDiedError: SIGKILL", 5))
    assert not book.slots[0].ready
    book.ready(0, 6)
    again = started(book.fill(6))
    # Each retry runs alone on an idle worker; slot 1 is busy, so one waits.
    assert [(lease.shard, lease.attempt, lease.solo, lease.slot) for lease in again] == [(b.shard, 2, True, 0)]
    book.succeeded(again[0].id, summary(again[0]))
    for lease in (c, d):
        book.succeeded(lease.id, summary(lease))
    later = started(book.fill(7))
    assert [(lease.shard, lease.attempt, lease.solo) for lease in later] == [(a.shard, 2, True)]
    book.succeeded(later[0].id, summary(later[0]))
    assert not book.unfinished and {s.attempt for s in book.committed.values()} == {1, 2}


def test_engine_that_hangs_is_replaced_and_its_shard_retried():
    book = make_book(2, slots=1, hang_timeout_s=8)
    a, b = started(book.fill(0))
    book.observe(0, heartbeat=1, busy={"in_step": False}, context=8192, now=1)
    assert book.watchdog(8.5) == []  # 7.5 s since the last beat
    [replace] = book.watchdog(9.5)
    assert replace.slot == 0 and replace.counted
    assert replace.reason == ("its engine made no progress for 8s (limit 8s) with 2 shard(s) in "
                              "hand (run.hang_timeout_s)")
    assert book.watchdog(100) == []  # the replacement is loading; its leases are not re-judged
    died = book.died(a.id, "ActorDiedError: killed by ray.kill", 10)
    assert not of(Replace, died)  # the watchdog replaced it already
    assert of(Retry, died)[0].reason.startswith("worker 0 was replaced: its engine made no progress")
    book.died(b.id, "ActorDiedError", 10)
    book.ready(0, 20)
    assert [lease.attempt for lease in started(book.fill(20))] == [2]


def test_replacement_that_never_loads_gives_up_after_worker_start_timeout():
    book = make_book(1, worker_start_timeout_s=100)
    [a] = started(book.fill(0))
    book.died(a.id, "ActorDiedError", 1)
    assert book.watchdog(100) == []
    [give_up] = book.watchdog(102)
    assert give_up == GiveUp("worker 0's replacement was not ready after 100s")


def test_crash_loop_gives_up_but_probe_deaths_are_not_counted():
    book = make_book(1, max_attempts=1)
    assert isinstance(book.replace(0, "died", 0), Replace)
    assert isinstance(book.replace(0, "died", 0), Replace)
    assert isinstance(book.replace(0, "died", 0, counted=False), Replace)
    assert book.replace(0, "died", 0) == GiveUp("worker 0 was replaced 2 times; last: died")


def test_long_prefill_with_big_step_tokens_is_not_a_hang():
    book = make_book(1, hang_timeout_s=15)
    book.fill(0)
    # One step prefilling 6000 tokens of a 2048-token context may take 15 s * 6000/2048.
    book.observe(0, heartbeat=1, busy={"in_step": True, "step_tokens": 6000}, context=2048, now=0)
    assert hang_limit(15, book.slots[0].busy, 2048) == pytest.approx(15 * 6000 / 2048)
    assert book.watchdog(40) == []
    assert of(Replace, book.watchdog(45))


def test_static_batch_whose_layers_beat_is_not_a_hang():
    # Three long prompts in one step: under a context's worth of tokens, so the limit stays
    # 15 s, but the decoder layers beat as they finish, and each beat is progress.
    book = make_book(1, hang_timeout_s=15)
    book.fill(0)
    for t in range(0, 40, 5):
        book.observe(0, heartbeat=t, busy={"in_step": True, "step_tokens": 7800}, context=8192, now=t)
        assert book.watchdog(t + 4) == []
    assert book.watchdog(60)  # and once they stop, it is a hang


def test_idle_worker_clock_starts_with_its_new_work():
    book = make_book(1, hang_timeout_s=10)
    assert book.watchdog(1000) == []  # idle: nothing in hand, never hung
    book.fill(1000)
    assert book.watchdog(1009) == [] and book.watchdog(1011)


# --------------------------------------------------------------------------- narrowing


def test_row_that_kills_its_worker_is_narrowed_to_a_row_error():
    book = make_book(1, slots=1, rows=5)
    made = play(book, {0: {2}})
    assert [d for d in made if isinstance(d, Narrow)] == [Narrow(0, 2, "killed by row 2")]
    assert of(Poisoned, made) == [Poisoned(0, {2: "killed by row 2"})]
    probes = [lease.probe for lease in started(made) if lease.probe is not None]
    assert probes == [[0, 1], [2, 3, 4], [2], [3, 4]]
    # Probe deaths are expected: they do not count towards the crash-loop limit.
    assert [r.counted for r in of(Replace, made)] == [True, True, False, False]
    assert book.committed[0].attempt == 3 and book.committed[0].skip == {2: "killed by row 2"}
    assert book.failed == {}


def test_poison_rows_in_one_row_shards_are_narrowed_and_their_neighbours_survive():
    # A worker holds two one-row shards at a time: innocent shards die with the poison ones.
    book = make_book(4, slots=1, rows=1, shards_per_worker=2)
    made = play(book, {1: {0}, 2: {0}})
    assert sorted(book.committed) == [0, 1, 2, 3] and book.failed == {}
    assert {i: s.skip for i, s in book.committed.items()} == {
        0: None, 1: {0: "killed by row 0"}, 2: {0: "killed by row 0"}, 3: None}
    assert sorted(p.shard for p in of(Poisoned, made)) == [1, 2]


def test_while_solo_work_waits_a_worker_not_running_solo_work_drains_for_it():
    """Slot 0 runs one solo probe and another waits: the least busy of the other workers
    stops taking shards so the waiting one gets an idle worker (it used to pick slot 0,
    which holds one lease, and solo work then ran one at a time behind it)."""
    book = make_book(40, slots=3, rows=5, shards_per_worker=2)
    for lease in started(book.fill(0)):
        if lease.slot == 0:
            book.succeeded(lease.id, summary(lease))
    book.queue.remove(38)  # as if shard 38 were being narrowed
    book.attempts[38] = 2
    book.solo.extend([(38, [0, 1]), (38, [2, 3])])
    [probe] = started(book.fill(1))
    assert probe.slot == 0 and probe.solo and len(book.solo) == 1
    first, second = book.held(1)
    book.succeeded(first.id, summary(first))
    assert started(book.fill(2)) == []  # slot 1 drains: no new shard in the room it has
    book.succeeded(second.id, summary(second))
    [waiting] = started(book.fill(3))  # idle now: the waiting probe is its
    assert waiting.slot == 1 and waiting.solo and waiting.probe == [2, 3] and not book.solo


def test_a_shard_out_of_attempts_is_not_narrowed_but_failed():
    book = make_book(1, rows=5, max_attempts=2)
    made = play(book, {0: {2}})
    assert not of(Narrow, made)
    assert book.failed == {0: "worker 0 died: killed by row 2"} and book.committed == {}


def test_a_probe_that_raises_without_killing_its_worker_passes():
    book = make_book(1, rows=2)
    for now in (0, 1):  # two deaths: attempt 1, then attempt 2 alone
        [lease] = started(book.fill(now))
        made = book.died(lease.id, "boom", now)
        book.ready(0, now)
    assert of(Narrow, made)
    [first] = started(book.fill(2))  # one probe per idle worker
    assert first.probe == [0] and book.errored(first.id, "ValueError: bad") == []
    [second] = started(book.fill(3))
    assert second.probe == [1]
    made = book.errored(second.id, "ValueError: bad")
    assert made == [Poisoned(0, {})]  # no row kills a worker alone: the shard runs once more
    [last] = started(book.fill(4))
    assert (last.attempt, last.skip, last.solo) == (3, {}, True)


# --------------------------------------------------------------------------- speculation


def straggling_book(slots: int = 2, **rules) -> tuple[LeaseBook, Lease]:
    """Workers holding one shard each; shards 0-2 commit in 10 s, shard 3 straggles."""
    book = make_book(4, slots=slots, shards_per_worker=1, speculate_after_s=3, **rules)
    now = 0.0
    straggler = None
    while book.queue or straggler is None:
        for lease in started(book.fill(now)):
            if lease.shard == 3:
                straggler = lease
            else:
                book.succeeded(lease.id, summary(lease, generate_s=10))
        now += 10
    return book, straggler


def test_straggler_is_raced_once_nothing_is_left_to_hand_out():
    book, straggler = straggling_book(slots=3)
    # Median 10 s: a copy only after 2 x 10 s, however low speculate_after_s.
    assert book.speculate(straggler.started + 19) == []
    [race] = book.speculate(straggler.started + 21)
    assert (race.lease.shard, race.lease.attempt, race.lease.speculative) == (3, straggler.attempt, True)
    assert race.lease.slot != straggler.slot and race.ran_s == 21 and race.median_s == 10
    assert [s.index for s in book.slots if not book.held(s.index)]  # a worker is still idle
    assert book.speculate(straggler.started + 100) == []  # but one copy per shard


def test_a_retry_running_alone_is_not_raced():
    book = make_book(1, slots=2, speculate_after_s=1)
    [lease] = started(book.fill(0))
    book.died(lease.id, "ActorDiedError", 0)
    [retry] = started(book.fill(0))
    assert retry.solo and book.speculate(1000) == []


def test_racing_copy_commits_first_and_the_straggler_is_cancelled_and_ignored():
    book, straggler = straggling_book()
    [race] = book.speculate(straggler.started + 21)
    made = book.succeeded(race.lease.id, summary(race.lease))
    assert made == [Commit(3, summary(race.lease)), Cancel(straggler)]
    assert not book.leases and not book.unfinished
    # The straggler's late result (it lost the commit, or was killed) changes nothing.
    assert book.succeeded(straggler.id, summary(straggler)) == []
    assert book.died(straggler.id, "TaskCancelledError", 99) == []
    assert book.committed[3].attempt == 1 and book.failed == {}


def test_straggler_commits_first_and_the_copy_is_cancelled():
    book, straggler = straggling_book()
    [race] = book.speculate(straggler.started + 21)
    assert book.succeeded(straggler.id, summary(straggler))[1:] == [Cancel(race.lease)]
    assert book.errored(race.lease.id, "lost") == [] and not book.unfinished


def test_a_dead_copy_does_not_count_against_its_shard_while_the_original_runs():
    book, straggler = straggling_book()
    [race] = book.speculate(straggler.started + 21)
    made = book.died(race.lease.id, "ActorDiedError", 40)
    assert of(Replace, made) and not of(Retry, made) and not of(Fail, made)
    assert book.attempts[3] == 1 and 3 not in book.deaths


def test_an_idle_worker_takes_a_copy_of_a_shard_queued_behind_another_at_once():
    """The end of the run: worker 1 holds two shards, worker 0 has nothing left. The one
    waiting behind worker 1's current shard is copied to worker 0 right away (no straggler
    threshold); the current one is not, until it straggles."""
    book = make_book(4, slots=2, shards_per_worker=2)
    leases = started(book.fill(0))
    on_0 = [lease for lease in leases if lease.slot == 0]
    for lease in on_0:
        book.succeeded(lease.id, summary(lease, generate_s=1))
    current, waiting = sorted((lease for lease in leases if lease.slot == 1), key=lambda lease: lease.id)
    [race] = book.speculate(1)
    assert race.queued and race.lease.shard == waiting.shard and race.lease.slot == 0
    assert book.speculate(2) == []  # worker 0 is busy with the copy now
    made = book.succeeded(race.lease.id, summary(race.lease))  # the copy commits first
    assert made == [Commit(waiting.shard, summary(race.lease)), Cancel(waiting)]
    assert book.speculate(3) == []  # the current shard is no straggler yet
    assert book.speculate(1000)[0].lease.shard == current.shard


def test_a_fast_worker_holds_enough_shards_for_prefetch_s_of_its_work():
    book = make_book(400, slots=2, rows=100, prefetch_s=10)  # shards_per_worker null: automatic
    assert len(started(book.fill(0))) == 4  # no rate known yet: shards_per_worker each
    for slot, rows_at_5s in ((0, 250), (1, 20)):  # 50 rows/s and 4 rows/s
        book.observe(slot, heartbeat=1, busy=None, context=None, now=0, rows=0)
        book.observe(slot, heartbeat=2, busy=None, context=None, now=5, rows=rows_at_5s)
    assert book.capacity(book.slots[0]) == 1 + 5 and book.capacity(book.slots[1]) == 2
    more = started(book.fill(5))
    assert [lease.slot for lease in more] == [0] * 4
    book.observe(0, heartbeat=3, busy=None, context=None, now=10, rows=100_000)  # capped
    assert book.capacity(book.slots[0]) == 16
    while len(book.queue) > 20:  # near the end: no deeper than a quarter of the queue shared out
        book.queue.pop()
    assert book.capacity(book.slots[0]) == 2 + 20 // (4 * 2)


def test_a_worker_holds_enough_small_shards_to_fill_its_engine_window():
    book = make_book(100, slots=1, rows=50)
    book.slots[0].window = 512  # 2 x max_batch_size 256: shards of 50 rows would leave it part empty
    assert book.capacity(book.slots[0]) == 1 + 11 and len(started(book.fill(0))) == 12
    book = make_book(100, slots=1, rows=5000)
    book.slots[0].window = 512  # big shards: two already hold more than the window
    assert book.capacity(book.slots[0]) == 2
    book = make_book(100, slots=1, rows=50, shards_per_worker=3)
    book.slots[0].window = 512  # a shards_per_worker the config sets is what a worker holds
    assert book.capacity(book.slots[0]) == 3


def test_a_short_queue_is_shared_out_evenly_not_taken_by_the_first_worker_asked():
    """Long prompts: shards of 64 rows and an engine window of 512 would let each worker
    hold nine. With 20 shards the first two workers took them all and the others idled
    (long-prompt runs at 0.58x the engine alone); now each takes its fair share."""
    book = make_book(20, slots=4, rows=64)
    for slot in book.slots:
        slot.window = 512
    leases = started(book.fill(0))
    assert sorted(Counter(lease.slot for lease in leases).values()) == [5, 5, 5, 5]
    for lease in [lease for lease in leases if lease.slot == 0]:  # worker 0 is done first
        book.succeeded(lease.id, summary(lease))
    book.queue.extend([100, 101, 102])  # say, retries queued again near the end
    more = started(book.fill(1))
    assert [lease.slot for lease in more] == [0, 0, 0]  # it is the emptiest: it takes them
    book = make_book(6, slots=4, rows=64)
    for slot in book.slots:
        slot.window = 512
    held = Counter(lease.slot for lease in started(book.fill(0)))
    assert sorted(held.values()) == [1, 1, 2, 2]  # fewer shards than room: one round each first


def test_no_speculation_when_disabled_or_while_shards_are_queued():
    book, straggler = straggling_book(speculative=False)
    assert book.speculate(1000) == []
    book = make_book(4, slots=1, shards_per_worker=1, speculate_after_s=1)
    book.fill(0)
    assert book.speculate(1000) == []


# --------------------------------------------------------------------------- failing shards


def test_shard_that_always_kills_its_worker_fails_after_max_attempts_and_the_run_is_partial():
    book = make_book(4, slots=2, shards_per_worker=1, rows=5, max_attempts=2)
    made = play(book, {2: {1}})
    assert sorted(book.committed) == [0, 1, 3]
    assert list(book.failed) == [2] and "died" in book.failed[2]
    assert of(Fail, made) == [Fail(2, 2, book.failed[2])]
    assert book.attempts[2] == 2


def test_shard_whose_task_keeps_raising_is_requeued_then_failed():
    book = make_book(1, max_attempts=3)
    for attempt in (1, 2, 3):
        [lease] = started(book.fill(attempt))
        assert lease.attempt == attempt and not lease.solo  # no death: no need to run alone
        made = book.errored(lease.id, "OSError: flaky read")
    assert made == [Fail(0, 3, "OSError: flaky read")] and not book.unfinished
    assert book.deaths == {}


def test_a_fatal_error_drops_the_lease_without_a_retry():
    book = make_book(1)
    [lease] = started(book.fill(0))
    book.drop(lease.id)
    assert not book.leases and book.attempts == {0: 1} and not book.failed


# --------------------------------------------------------------------------- stopping


def test_stop_hands_out_nothing_more_and_waits_for_shards_in_flight():
    book = make_book(6, slots=1, shards_per_worker=2, stop_grace_s=60, speculate_after_s=1)
    a, b = started(book.fill(0))
    assert book.stop(10) and not book.stop(11)  # the first call says so
    assert book.fill(12) == [] and book.speculate(500) == []
    assert not book.interrupted(12)
    book.succeeded(a.id, summary(a))
    assert not book.interrupted(13)
    book.succeeded(b.id, summary(b))
    assert book.interrupted(14) and sorted(book.committed) == [0, 1]
    assert list(book.queue) == [2, 3, 4, 5]  # left for the rerun


def test_stop_gives_up_on_shards_in_flight_after_the_grace_period():
    book = make_book(2, stop_grace_s=30)
    book.fill(0)
    book.stop(10)
    assert not book.interrupted(40) and book.interrupted(40.5)


# --------------------------------------------------------------------------- properties


class LeaseBookMachine(RuleBasedStateMachine):
    """Random events against a LeaseBook, checking its promises after each."""

    def __init__(self):
        super().__init__()
        self.now = 0.0
        self.commits: dict[int, int] = {}
        self.gone: list[int] = []

    @initialize(shards=st.integers(1, 6), slots=st.integers(1, 3), rows=st.integers(1, 4),
          max_attempts=st.integers(1, 4), per_worker=st.integers(1, 3),
          speculative=st.sampled_from([True, True, True, False]))
    def start(self, shards, slots, rows, max_attempts, per_worker, speculative):
        self.book = make_book(shards, slots=slots, rows=rows, max_attempts=max_attempts,
                              shards_per_worker=per_worker, speculative=speculative,
                              speculate_after_s=5, hang_timeout_s=20, stop_grace_s=30,
                              worker_start_timeout_s=10_000)

    def _apply(self, decisions) -> None:
        for d in decisions:
            if isinstance(d, Commit):
                self.commits[d.shard] = self.commits.get(d.shard, 0) + 1
            elif isinstance(d, Cancel):
                self.gone.append(d.lease.id)

    def _pick(self, data) -> Lease:
        leases = sorted(self.book.leases.values(), key=lambda lease: -lease.id)  # newest first
        return data.draw(st.sampled_from(leases))

    @rule()
    def fill(self):
        self._apply(self.book.fill(self.now))

    @rule()
    def speculate(self):
        self._apply(self.book.speculate(self.now))

    @rule(dt=st.sampled_from([0.5, 3, 10, 40]))
    def time_passes(self, dt):
        self.now += dt

    @precondition(lambda self: self.book.leases)
    @rule(data=st.data())
    def commit(self, data):
        lease = self._pick(data)
        self._apply(self.book.succeeded(lease.id, None if lease.probe else summary(lease)))
        self.gone.append(lease.id)

    @precondition(lambda self: self.book.leases)
    @rule(data=st.data())
    def worker_finishes(self, data):
        """A worker commits all it holds and is idle (the others may be stragglers)."""
        for lease in self.book.held(self._pick(data).slot):
            self._apply(self.book.succeeded(lease.id, None if lease.probe else summary(lease)))
            self.gone.append(lease.id)

    @precondition(lambda self: self.book.leases)
    @rule(data=st.data())
    def straggler(self, data):
        """One shard runs long while the other workers finish the rest of the queue and
        become ready: the idle ones race it (what follows decides which copy ends first)."""
        slow = self._pick(data)
        for _ in range(20):
            for slot in self.book.slots:
                if not slot.ready and slot.index != slow.slot:
                    self.book.ready(slot.index, self.now)
            for lease in list(self.book.leases.values()):
                if lease.slot != slow.slot:
                    self._apply(self.book.succeeded(lease.id, None if lease.probe else summary(lease)))
                    self.gone.append(lease.id)
            self._apply(self.book.fill(self.now))
            if not self.book.queue or not any(lease.slot != slow.slot for lease in self.book.leases.values()):
                break
        self.now += 100
        self._apply(self.book.speculate(self.now))

    @precondition(lambda self: self.book.leases)
    @rule(data=st.data())
    def task_error(self, data):
        lease = self._pick(data)
        self._apply(self.book.errored(lease.id, "RuntimeError: flaky"))
        self.gone.append(lease.id)

    @precondition(lambda self: self.book.leases)
    @rule(data=st.data())
    def worker_death(self, data):
        slot = self._pick(data).slot
        for lease in self.book.held(slot):  # its actor's calls all fail
            self._apply(self.book.died(lease.id, "ActorDiedError", self.now))
            self.gone.append(lease.id)

    @precondition(lambda self: self.gone)
    @rule(data=st.data())
    def late_result(self, data):
        """A result for a lease that already ended (a cancelled copy, a duplicate)."""
        lease_id = data.draw(st.sampled_from(self.gone))
        before = (dict(self.book.committed), dict(self.book.failed), dict(self.book.attempts))
        assert self.book.succeeded(lease_id, {"generate_s": 0.0, "late": True}) == []
        assert self.book.died(lease_id, "late", self.now) == []
        assert (self.book.committed, self.book.failed, self.book.attempts) == before

    @rule(slot=st.integers(0, 2), beat=st.integers(0, 3), in_step=st.booleans(),
          tokens=st.integers(0, 50_000))
    def heartbeat(self, slot, beat, in_step, tokens):
        if slot < len(self.book.slots) and self.book.slots[slot].ready:
            self.book.observe(slot, heartbeat=beat, busy={"in_step": in_step, "step_tokens": tokens},
                              context=8192, now=self.now)

    @rule()
    def watchdog(self):
        self._apply(self.book.watchdog(self.now))

    @precondition(lambda self: not all(s.ready for s in self.book.slots))
    @rule(data=st.data())
    def replacement_ready(self, data):
        slot = data.draw(st.sampled_from([s.index for s in self.book.slots if not s.ready]))
        self.book.ready(slot, self.now)

    @rule(roll=st.integers(0, 19))
    def stop(self, roll):
        if roll == 0:  # rarely: a stopped book hands out nothing more
            self.book.stop(self.now)

    # ------------------------------------------------------------------ promises

    @invariant()
    def committed_or_failed_never_both_nor_twice(self):
        assert not set(self.book.committed) & set(self.book.failed)
        assert all(n == 1 for n in self.commits.values())
        assert set(self.commits) == set(self.book.committed)

    @invariant()
    def attempts_never_exceed_max_attempts(self):
        limit = self.book.rules.max_attempts
        assert all(n <= limit for n in self.book.attempts.values())
        assert all(lease.attempt <= limit for lease in self.book.leases.values())

    @invariant()
    def no_lease_outlives_its_shards_end(self):
        ended = set(self.book.committed) | set(self.book.failed)
        assert not [lease for lease in self.book.leases.values() if lease.shard in ended]

    @invariant()
    def every_shard_is_accounted_for_once(self):
        book = self.book
        queued = list(book.queue)
        assert len(queued) == len(set(queued))
        retries = [shard for shard, rows in book.solo if rows is None]
        assert len(retries) == len(set(retries))
        leased = {lease.shard for lease in book.leases.values()}
        probing = {shard for shard, rows in book.solo if rows is not None} | {
            lease.shard for lease in book.leases.values() if lease.probe is not None}
        for shard in range(len(book.rows)):
            places = [shard in book.committed, shard in book.failed, shard in queued,
                      shard in retries, shard in leased or shard in probing]
            assert sum(places) == 1, (shard, places)

    def teardown(self):
        """Once the events stop, workers that just work finish everything."""
        book = self.book
        if book.stop_deadline is not None:
            return
        for _ in range(200):
            if not book.unfinished:
                break
            for slot in book.slots:
                if not slot.ready:
                    book.ready(slot.index, self.now)
            self._apply(book.fill(self.now) + book.speculate(self.now))
            for lease in list(book.leases.values()):
                self._apply(book.succeeded(lease.id, None if lease.probe else summary(lease)))
            self.now += 1
        assert not book.unfinished
        assert set(book.committed) | set(book.failed) == set(range(len(book.rows)))
        assert not set(book.committed) & set(book.failed)
        assert all(n == 1 for n in self.commits.values())


LeaseBookMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_lease_book_keeps_its_promises = LeaseBookMachine.TestCase
