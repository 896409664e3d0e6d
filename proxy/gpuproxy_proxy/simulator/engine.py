"""The engine model: batch slots, a FIFO waiting queue, a prefix-cached KV cache, timed iterations.

Pure and clock-free: callers pass `now` (simulated seconds) and get back when an iteration ends.
One iteration = admit waiting requests (FIFO, head-of-line; a request needs a free slot and KV
blocks for its whole sequence, prompt + max_tokens, reserved up front, so nothing is ever
preempted), then one forward pass that prefills the admitted and decodes one token for each
running sequence. Its duration, in simulated seconds:

    prefill(r) = prefill_overhead_seconds + uncached_prompt_tokens(r) / prefill_tokens_per_second
    decode(n)  = decode_interval_seconds * (1 + decode_slowdown_per_seq * (n - 1))
    iteration  = sum(prefill(r) for admitted r) + (decode(running) if any sequence is decoding)

A prefilled request emits its first token at the end of its iteration (TTFT = end - arrival).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gpuproxy_proxy.simulator.config import EngineConfig
from gpuproxy_proxy.simulator.kvcache import KVCache
from gpuproxy_proxy.simulator.tokens import block_hashes


class RequestTooLarge(ValueError):
    """The request cannot ever run: longer than max_model_len or than the whole KV cache."""


@dataclass(frozen=True)
class SequenceRequest:
    """What the engine needs of a request; `cache_salt` separates models/LoRA adapters."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    finish_reason: str = "length"
    cache_salt: str = ""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; `ttft_seconds` on the first, `e2e_seconds` on the last."""

    request_id: str
    index: int
    time: float
    finished: bool
    cached_tokens: int
    ttft_seconds: float | None = None
    e2e_seconds: float | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the counters and gauges vLLM exports."""

    running: int
    waiting: int
    kv_usage: float
    used_blocks: int
    cached_blocks: int
    evictions: int
    prefix_queries: int
    prefix_hits: int
    prompt_tokens: int
    generation_tokens: int
    finished: dict[str, int]


@dataclass
class _Sequence:
    request: SequenceRequest
    arrival: float
    blocks: tuple[int, ...] = ()
    cached_tokens: int = 0
    generated: int = 0


@dataclass
class _Counters:
    prefix_queries: int = 0
    prefix_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)


class Engine:
    """Simulated vLLM scheduler + KV cache; call begin_iteration/finish_iteration in turn."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.kv = KVCache(config.num_gpu_blocks, config.block_size)
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[str, _Sequence] = {}
        self._in_flight: list[_Sequence] = []
        self._iteration_end: float | None = None
        self._counters = _Counters()

    def blocks_needed(self, prompt_tokens: int, max_tokens: int) -> int:
        return -(-(prompt_tokens + max_tokens) // self.config.block_size)

    def submit(self, request: SequenceRequest, now: float) -> None:
        """Queues a request (FIFO) or raises RequestTooLarge if it could never be admitted."""
        length = len(request.prompt_token_ids) + request.max_tokens
        if not request.prompt_token_ids or request.max_tokens < 1:
            raise RequestTooLarge("a request needs at least one prompt token and max_tokens >= 1")
        if length > self.config.max_model_len:
            raise RequestTooLarge(
                f"prompt ({len(request.prompt_token_ids)} tokens) + max_tokens "
                f"({request.max_tokens}) exceeds max_model_len {self.config.max_model_len}")
        blocks = self.blocks_needed(len(request.prompt_token_ids), request.max_tokens)
        if blocks > self.kv.num_blocks:
            raise RequestTooLarge(f"the request needs more than {self.kv.num_blocks} KV blocks")
        self._waiting.append(_Sequence(request=request, arrival=now))

    def abort(self, request_id: str) -> bool:
        """Drops a waiting or running request (client gone) and frees its blocks."""
        sequence = self._running.pop(request_id, None)
        if sequence is not None:
            self.kv.free(sequence.blocks)
        else:
            sequence = next((s for s in self._waiting if s.request.request_id == request_id), None)
            if sequence is None:
                return False
            self._waiting.remove(sequence)
        self._counters.finished["abort"] = self._counters.finished.get("abort", 0) + 1
        return True

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def prefill_seconds(self, uncached_tokens: int) -> float:
        cfg = self.config
        return cfg.prefill_overhead_seconds + uncached_tokens / cfg.prefill_tokens_per_second

    def decode_seconds(self, batch: int) -> float:
        cfg = self.config
        return cfg.decode_interval_seconds * (1 + cfg.decode_slowdown_per_seq * (batch - 1))

    def begin_iteration(self, now: float) -> float | None:
        """Admits what fits and starts a forward pass; returns its end time, None when idle."""
        if self._iteration_end is not None:
            raise RuntimeError("finish_iteration() must be called before the next iteration")
        decoding = len(self._running)
        admitted = self._admit()
        if not self._running:
            return None
        duration = sum(self.prefill_seconds(len(s.request.prompt_token_ids) - s.cached_tokens)
                       for s in admitted)
        if decoding:
            duration += self.decode_seconds(len(self._running))
        self._in_flight = list(self._running.values())
        self._iteration_end = now + duration
        return self._iteration_end

    def finish_iteration(self) -> list[TokenEvent]:
        """Ends the pass: one token per sequence still running; finished ones free their blocks."""
        end = self._iteration_end
        if end is None:
            raise RuntimeError("no iteration in progress")
        self._iteration_end = None
        events = []
        for sequence in self._in_flight:
            request_id = sequence.request.request_id
            if self._running.get(request_id) is not sequence:
                continue  # aborted during the pass
            sequence.generated += 1
            self._counters.generation_tokens += 1
            finished = sequence.generated >= sequence.request.max_tokens
            events.append(TokenEvent(
                request_id=request_id, index=sequence.generated - 1, time=end, finished=finished,
                cached_tokens=sequence.cached_tokens,
                ttft_seconds=end - sequence.arrival if sequence.generated == 1 else None,
                e2e_seconds=end - sequence.arrival if finished else None))
            if finished:
                del self._running[request_id]
                self.kv.free(sequence.blocks)
                reason = sequence.request.finish_reason
                self._counters.finished[reason] = self._counters.finished.get(reason, 0) + 1
        self._in_flight = []
        return events

    def _admit(self) -> list[_Sequence]:
        admitted = []
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            sequence = self._waiting[0]
            request = sequence.request
            prompt = request.prompt_token_ids
            hashes = block_hashes(prompt, self.config.block_size, request.cache_salt)
            needed = self.blocks_needed(len(prompt), request.max_tokens)
            allocation = self.kv.allocate(hashes, needed)
            if allocation is None:
                break  # FIFO: the head waits for space, nothing overtakes it
            self._waiting.popleft()
            sequence.blocks = allocation.blocks
            sequence.cached_tokens = allocation.hit_blocks * self.config.block_size
            self._counters.prefix_queries += len(prompt)
            self._counters.prefix_hits += sequence.cached_tokens
            self._counters.prompt_tokens += len(prompt)
            self._running[request.request_id] = sequence
            admitted.append(sequence)
        return admitted

    def stats(self) -> EngineStats:
        counters = self._counters
        return EngineStats(
            running=len(self._running), waiting=len(self._waiting), kv_usage=self.kv.usage,
            used_blocks=self.kv.num_used, cached_blocks=self.kv.num_cached,
            evictions=self.kv.evictions, prefix_queries=counters.prefix_queries,
            prefix_hits=counters.prefix_hits, prompt_tokens=counters.prompt_tokens,
            generation_tokens=counters.generation_tokens, finished=dict(counters.finished))
