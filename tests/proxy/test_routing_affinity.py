"""Engine-aware strategies, the pure parts: rendezvous hashing with a load cap (same choice in
every instance, cap respected, only a leaving backend's keys move), least_load's score, model
affinity and per-model overrides in the pool."""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field

from gpuproxy_proxy.config import BackendConfig, LoadBalancingConfig
from gpuproxy_proxy.observability.metrics import ProxyMetrics
from gpuproxy_proxy.routing.affinity import LeastLoad, PrefixAffinity, bounded_choice
from gpuproxy_proxy.routing.backends import build_pool
from gpuproxy_proxy.routing.hints import RequestHints, stable_hash
from gpuproxy_proxy.routing.signals import BackendSignals


@dataclass(eq=False)
class Fake:
    name: str
    in_flight: int = 0
    signals: BackendSignals | None = None
    picks: int = 0
    name_hash: int = field(init=False)

    def __post_init__(self) -> None:
        self.name_hash = stable_hash(self.name.encode())


KEYS = [stable_hash(f"tenant-{i}".encode()) for i in range(2000)]


def choices(backends: list[Fake], loads: list[float] | None = None) -> dict[int, str]:
    loads = loads or [0.0] * len(backends)
    return {key: bounded_choice(backends, key, loads, 1.25)[0].name for key in KEYS}


def test_same_choice_in_every_instance_whatever_the_order() -> None:
    names = [f"b{i}" for i in range(6)]
    one = choices([Fake(n) for n in names])
    other = choices([Fake(n) for n in reversed(names)])
    assert one == other
    spread = {name: sum(1 for v in one.values() if v == name) for name in names}
    assert min(spread.values()) > len(KEYS) / 6 * 0.7  # keys spread over every backend


def test_a_leaving_backend_moves_only_its_own_keys() -> None:
    backends = [Fake(f"b{i}") for i in range(6)]
    before = choices(backends)
    after = choices([b for b in backends if b.name != "b3"])
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == "b3"}
    # ... and coming back takes exactly those back.
    assert choices(backends) == before


def test_load_cap_spills_to_the_keys_next_backend() -> None:
    backends = [Fake(f"b{i}") for i in range(4)]
    key = KEYS[0]
    first, spilled = bounded_choice(backends, key, [0, 0, 0, 0], 1.25)
    assert not spilled
    hot = backends.index(first)
    loads = [0.0] * 4
    loads[hot] = 10.0  # cap = ceil(1.25 * 11 / 4) = 4
    second, spilled = bounded_choice(backends, key, loads, 1.25)
    assert spilled
    assert second is not first
    # Always the same runner-up, and the cap holds for any load pattern.
    assert bounded_choice(backends, key, loads, 1.25)[0] is second
    for loads in ([3, 3, 3, 3], [7, 0, 1, 2], [100, 100, 100, 0]):
        for slack in (0, 8):
            chosen, _ = bounded_choice(backends, key, loads, 1.25, slack)
            cap = -(-1.25 * (sum(loads) + 1) // 4) + slack
            assert loads[backends.index(chosen)] + 1 <= cap
    # The slack keeps a key home through small imbalances (a batch of a few more).
    loads = [0.0] * 4
    loads[hot] = 6.0
    assert bounded_choice(backends, key, loads, 1.25, 8) == (first, False)


def test_hot_prefix_is_bounded_under_a_burst() -> None:
    """One key, 400 requests that all stay in flight: no backend takes over 1.25x the mean
    (+1, + the default slack of 8)."""
    backends = [Fake(f"b{i}") for i in range(4)]
    balancer = PrefixAffinity(LoadBalancingConfig(strategy="prefix_affinity"))
    hints = RequestHints(prefix_key=KEYS[1])
    for _ in range(400):
        chosen = balancer.pick_for(backends, hints, time.monotonic())
        assert chosen is not None
        chosen.in_flight += 1
    assert max(b.in_flight for b in backends) <= 1.25 * 100 + 1 + 8


def sig(waiting: float, running: float, kv: float = 0.0) -> BackendSignals:
    return BackendSignals(scraped_at=time.monotonic(), engine="vllm", waiting=waiting,
                          running=running, kv_usage=kv)


def test_least_load_scores_queue_running_and_kv() -> None:
    """Two random candidates, the lower score: the most loaded backend never wins a pair,
    the least loaded one wins every pair it is in."""
    balancer = LeastLoad(LoadBalancingConfig(strategy="least_load"), random.Random(7))
    now = time.monotonic()
    queued, busy, free = Fake("queued", signals=sig(20, 4)), Fake("busy", signals=sig(0, 9)), \
        Fake("free", signals=sig(0, 3, kv=0.9))
    picked = Counter(balancer.pick_for([queued, busy, free], None, now).name  # type: ignore[union-attr]
                     for _ in range(300))
    assert picked["queued"] == 0
    assert picked["free"] > 1.5 * picked["busy"] > 0  # in 2 of 3 pairs vs 1 of 3
    assert balancer.reason == "signals"
    free.picks = 10  # what this worker sent since the scrape counts too: now the busiest
    assert {balancer.pick_for([busy, free], None, now) for _ in range(20)} == {busy}


def test_least_load_falls_back_to_connections_when_signals_are_stale() -> None:
    balancer = LeastLoad(LoadBalancingConfig(strategy="least_load"))
    stale = BackendSignals(scraped_at=time.monotonic() - 60, engine="vllm", waiting=0,
                           running=0)
    a, b = Fake("a", in_flight=5, signals=stale), Fake("b", in_flight=1, signals=sig(50, 50))
    b.signals = BackendSignals(scraped_at=time.monotonic() - 60, waiting=50, running=50)
    assert {balancer.pick_for([a, b], None, time.monotonic()) for _ in range(10)} == {b}
    assert balancer.reason == "connections"


def test_model_affinity_and_per_model_override() -> None:
    metrics = ProxyMetrics()
    configs = [BackendConfig(name=n, url=f"http://127.0.0.1:{9000 + i}")  # type: ignore[arg-type]
               for i, n in enumerate(["a", "b", "c"])]
    lb = LoadBalancingConfig(strategy="round_robin", signals={"enabled": True},
                             per_model={"hot": "prefix_affinity"})
    pool = build_pool(configs, lb, metrics)
    now = time.monotonic()
    a, b, c = pool.backends
    a.apply_signals(BackendSignals(models=("base", "lora-x"), models_at=now))
    b.apply_signals(BackendSignals(models=("base", "hot"), models_at=now))
    c.apply_signals(None)  # no model list yet: may serve anything
    picked = set()
    for _ in range(12):
        chosen = pool.choose(hints=pool.hints_for({}, b'{"model": "lora-x", "prompt": "p"}'))
        assert chosen is not None
        chosen.release()
        picked.add(chosen.name)
    assert picked == {"a", "c"}
    # Nobody lists it: every backend may answer (with its own 404).
    chosen = pool.choose(hints=RequestHints(model="missing"))
    assert chosen is not None
    chosen.release()
    # The override: one system prompt, one backend, every time.
    body = b'{"model": "hot", "messages": [{"role": "system", "content": "S"}]}'
    hot = set()
    for _ in range(6):
        chosen = pool.choose(hints=pool.hints_for({}, body))
        assert chosen is not None
        chosen.release()  # done before the next one: the load cap stays out of the way
        hot.add(chosen.name)
    assert len(hot) == 1
    assert hot <= {"b", "c"}
    value = metrics.registry.get_sample_value(
        "gpuproxy_routing_decisions_total", {"strategy": "prefix_affinity", "reason": "affinity"})
    assert value == 6


def test_session_affinity_by_header_or_user_field() -> None:
    configs = [BackendConfig(name=n, url=f"http://127.0.0.1:{9000 + i}")  # type: ignore[arg-type]
               for i, n in enumerate(["a", "b", "c", "d"])]
    pool = build_pool(configs, LoadBalancingConfig(strategy="session_affinity"), ProxyMetrics())

    def route(headers: dict[str, str], body: bytes) -> str:
        chosen = pool.choose(hints=pool.hints_for(headers, body))
        assert chosen is not None
        chosen.release()
        return chosen.name

    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    sessions = {f"s{i}": route({"x-session-id": f"s{i}"}, body) for i in range(40)}
    for session, home in sessions.items():
        assert route({"x-session-id": session}, body) == home
    assert len(set(sessions.values())) == 4  # sessions spread over every backend
    users = {route({}, b'{"user": "u%d", "prompt": "x"}' % i) for i in range(40)}
    assert len(users) == 4
    assert len({route({}, b'{"user": "alice", "prompt": "%d"}' % i) for i in range(10)}) == 1
