"""The performance model of the simulated engine: pure, no clock, no asyncio.

One GPU runs one model with in-flight (continuous) batching, scheduled the way
TensorRT-LLM does with its default `GUARANTEED_NO_EVICT` policy (issue 11, item 1):

- admission, first come first served: a waiting request enters the batch while a slot is
  free (`max_batch_size`) and the KV cache can reserve its whole sequence, prompt plus
  every token it will generate, in blocks of 32 tokens (reserved up front, so nothing is
  ever evicted or paused);
- chunked prefill: one iteration computes at most `max_num_tokens` tokens, one per
  decoding request plus chunks of prompts in admission order; the iteration that ends a
  prompt also yields its first output token;
- one decode step for every request past its prefill;
- blocks are freed at completion. Full 32-token blocks of a prompt prefix are cached by a
  hash of every token up to the block's end; a later prompt that starts with the same
  blocks reuses them instead of computing them (LRU over blocks no running request holds).

An iteration takes `base_s + prefill_s_per_token * prefill_tokens + decode_s_per_seq *
batch + attn_s_per_ctx_token * context_tokens` (the profile's coefficients). Because the
schedule never depends on durations, total time is linear in the coefficients; the
fitting script (scripts/fit_simulated_profile.py) uses that.

Decoding requests are not visited one by one: they all advance one token per iteration,
so each one's finishing iteration is known when its prefill ends (a heap), and the batch's
context tokens are one running sum. A night-long shape simulates in milliseconds.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

BLOCK_TOKENS = 32


@dataclass(frozen=True)
class Profile:
    """One GPU and model: capacities and the iteration-time coefficients."""

    name: str
    kv_cache_tokens: int
    """Tokens the KV cache holds (all blocks together)."""
    max_batch_size: int
    """Requests in flight at once, the calibration's setting."""
    max_num_tokens: int
    """Most tokens (prompt chunks plus one per decoding request) computed in one iteration."""
    max_model_len: int
    """Most prompt + completion tokens of one request."""
    base_s: float
    """Fixed cost of one iteration (launches, sampling, scheduling)."""
    prefill_s_per_token: float
    """Cost of one prompt token computed."""
    decode_s_per_seq: float
    """Cost of one sequence decoding one token (weights are read once per iteration, so small)."""
    attn_s_per_ctx_token: float
    """Cost of attending to one cached token of a sequence that yields a token this iteration."""

    def duration(self, prefill_tokens: int, batch: int, context_tokens: int) -> float:
        return (self.base_s + self.prefill_s_per_token * prefill_tokens + self.decode_s_per_seq * batch
                + self.attn_s_per_ctx_token * context_tokens)


@dataclass(eq=False)
class _Seq:
    id: object
    prompt_len: int
    output_len: int
    to_prefill: int
    blocks: int  # blocks of its own (not shared prefix blocks)
    shared: list[int] = field(default_factory=list)  # hashes of the cached prefix blocks it holds


@dataclass
class Counters:
    """What the simulator did, in its own (virtual) time."""

    iterations: int = 0
    virtual_s: float = 0.0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    """Prompt tokens actually computed (prompt tokens minus reused prefix blocks)."""
    reused_tokens: int = 0
    output_tokens: int = 0
    """Tokens generated; also the sum over iterations of the batch (one token per sequence)."""
    context_tokens: int = 0
    """Sum over iterations of the context tokens attended."""
    finished: int = 0

    def terms(self) -> tuple[int, int, int, int]:
        """The sums that multiply the profile's four coefficients: virtual time is their dot product."""
        return self.iterations, self.prefill_tokens, self.output_tokens, self.context_tokens


@dataclass
class StepCost:
    """What one iteration computed, the terms of its duration."""

    prefill_tokens: int = 0
    batch: int = 0
    context_tokens: int = 0
    budget_full: bool = False
    """Prompt chunks and decoding requests used all of `max_num_tokens`: more requests
    could not have made this iteration do more."""


class Simulator:
    """One GPU in virtual time: `submit` requests, then `step()` one iteration at a time."""

    def __init__(self, profile: Profile, *, max_batch_size: int | None = None,
                 kv_cache_tokens: int | None = None, max_num_tokens: int | None = None):
        self.profile = profile
        self.max_batch_size = max_batch_size or profile.max_batch_size
        self.max_num_tokens = max_num_tokens or profile.max_num_tokens
        self.total_blocks = (kv_cache_tokens or profile.kv_cache_tokens) // BLOCK_TOKENS
        self.counters = Counters()
        self.last_cost = StepCost()
        self._waiting: deque[_Seq] = deque()
        self._prefilling: list[_Seq] = []
        self._decoding: list[tuple[int, int, _Seq]] = []  # heap of (finishing iteration, order, seq)
        self._context = 0  # tokens held by decoding requests
        self._used_blocks = 0  # private blocks plus cached blocks some running request holds
        self._refs: dict[int, int] = {}  # cached block hash -> running requests holding it
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first
        self._order = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._prefilling) + len(self._decoding)

    def idle(self) -> bool:
        return not self._waiting and self.running == 0

    def submit(self, request_id: object, prompt_len: int, output_len: int,
               prefix_token_ids: list[int] | None = None) -> None:
        """Queue a request; `prefix_token_ids` (the prompt's ids) lets its prefix blocks be reused."""
        if prompt_len < 1 or output_len < 1:
            raise ValueError(f"request {request_id!r}: prompt_len {prompt_len} and output_len {output_len} "
                             "must both be >= 1")
        needed = math.ceil((prompt_len + output_len) / BLOCK_TOKENS)
        if needed > self.total_blocks:
            raise ValueError(f"request {request_id!r}: needs {needed} KV blocks; the cache has {self.total_blocks}")
        seq = _Seq(request_id, prompt_len, output_len, prompt_len, needed)
        # Blocks wholly before the last prompt token: that one is always computed, since
        # computing it yields the first output token.
        seq.shared = _block_hashes(prefix_token_ids[:prompt_len - 1]) if prefix_token_ids else []
        self._waiting.append(seq)
        self.counters.prompt_tokens += prompt_len

    def abort(self, request_id: object) -> bool:
        """Drop a request wherever it is (waiting, prefilling or decoding) and free its
        blocks, as TensorRT-LLM does for an aborted request; False if it is not here."""
        for seq in self._waiting:
            if seq.id == request_id:
                self._waiting.remove(seq)
                return True
        for seq in self._prefilling:
            if seq.id == request_id:
                self._prefilling.remove(seq)
                self._release(seq)
                return True
        for entry in self._decoding:
            finish, _, seq = entry
            if seq.id == request_id:
                self._decoding.remove(entry)
                heapq.heapify(self._decoding)
                # tokens it holds now: all of it, less those it would still have generated
                self._context -= seq.prompt_len + seq.output_len - (finish - (self.counters.iterations - 1))
                self._release(seq)
                return True
        return False

    def step(self) -> tuple[float, list[object]]:
        """Run one iteration: its duration in seconds and the ids of the requests it finished."""
        self._admit()
        cost = StepCost()
        budget = self.max_num_tokens - len(self._decoding)
        started: list[_Seq] = []
        for seq in self._prefilling:
            chunk = min(seq.to_prefill, max(budget, 0))
            budget -= chunk
            cost.prefill_tokens += chunk
            seq.to_prefill -= chunk
            if seq.to_prefill == 0:
                started.append(seq)
        cost.budget_full = budget <= 0
        if started:
            self._prefilling = [s for s in self._prefilling if s.to_prefill > 0]
        cost.batch = len(self._decoding) + len(started)
        cost.context_tokens = self._context + sum(s.prompt_len for s in started)
        duration = self.profile.duration(cost.prefill_tokens, cost.batch, cost.context_tokens)
        it = self.counters.iterations
        self._context += len(self._decoding)
        for seq in started:  # the iteration that ends a prompt yields its first token
            self._context += seq.prompt_len + 1
            self._order += 1
            heapq.heappush(self._decoding, (it + seq.output_len - 1, self._order, seq))
        finished = []
        while self._decoding and self._decoding[0][0] <= it:
            seq = heapq.heappop(self._decoding)[2]
            self._context -= seq.prompt_len + seq.output_len
            self._release(seq)
            finished.append(seq.id)
        c = self.counters
        c.iterations += 1
        c.virtual_s += duration
        c.prefill_tokens += cost.prefill_tokens
        c.output_tokens += cost.batch
        c.context_tokens += cost.context_tokens
        c.finished += len(finished)
        self.last_cost = cost
        return duration, finished

    def _admit(self) -> None:
        while self._waiting and self.running < self.max_batch_size:
            seq = self._waiting[0]
            hits = 0
            for h in seq.shared:
                if h not in self._refs and h not in self._lru:
                    break
                hits += 1
            revived = sum(1 for h in seq.shared[:hits] if h in self._lru)
            fresh = seq.blocks - hits
            if self._used_blocks + revived + fresh > self.total_blocks:
                return  # first come first served: nobody overtakes the head of the queue
            self._waiting.popleft()
            for h in seq.shared[:hits]:
                self._lru.pop(h, None)
                self._refs[h] = self._refs.get(h, 0) + 1
            # The prompt's other full blocks become cached (as TensorRT-LLM registers a
            # request's context blocks for reuse), held by this request until it ends.
            own = seq.shared[hits:]
            for h in own:
                self._lru.pop(h, None)
                self._refs[h] = self._refs.get(h, 0) + 1
            self._used_blocks += revived + fresh
            seq.blocks = fresh - len(own)
            seq.to_prefill = seq.prompt_len - hits * BLOCK_TOKENS
            self.counters.reused_tokens += hits * BLOCK_TOKENS
            self._evict()
            self._prefilling.append(seq)

    def _release(self, seq: _Seq) -> None:
        self._used_blocks -= seq.blocks
        for h in seq.shared:
            self._refs[h] -= 1
            if self._refs[h] == 0:
                del self._refs[h]
                self._used_blocks -= 1
                self._lru[h] = None  # most recently used last
        self._evict()

    def _evict(self) -> None:
        """Drop least recently used cached blocks until held plus cached blocks fit the cache."""
        while self._lru and self._used_blocks + len(self._lru) > self.total_blocks:
            self._lru.popitem(last=False)


def _block_hashes(token_ids: list[int]) -> list[int]:
    """One hash per full block of the prompt, each covering every token up to its block's end."""
    hashes, h = [], 0
    for start in range(0, len(token_ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        h = hash((h, tuple(token_ids[start:start + BLOCK_TOKENS])))
        hashes.append(h)
    return hashes


def drive(sim: Simulator) -> float:
    """Step until every submitted request has finished; the virtual seconds it took."""
    start = sim.counters.virtual_s
    while not sim.idle():
        sim.step()
    return sim.counters.virtual_s - start


def saturated_throughput(profile: Profile, input_len: int, output_len: int, num_requests: int,
                         **limits: int | None) -> float:
    """Output tokens per second with `num_requests` equal requests all waiting at time 0
    (how trtllm-bench measures its throughput tables), driven in virtual time."""
    sim = Simulator(profile, **limits)
    for i in range(num_requests):
        sim.submit(i, input_len, output_len)
    return num_requests * output_len / drive(sim)
