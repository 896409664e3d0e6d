"""Leader election on a Lease: the election itself against an emulator that enforces
resourceVersion preconditions (never two leaders; an unrenewed lease is taken only after its
duration; a cut-off leader gives up within its renew deadline; a release hands over at once),
then two real operators: only the leader writes, and killing it mid-scale hands over in about
one lease duration without a double scale (the autoscaler's memory is in status)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import kopf
import pytest

from gpuproxy_operator import handlers, kube
from gpuproxy_operator.cli import build_parser
from gpuproxy_operator.commands import run
from gpuproxy_operator.leader import LeaderElector, LeadershipLost, LeaseConfig
from tests.autoscaling.conftest import POD_IPS
from tests.autoscaling.proxies import free_port_on
from tests.autoscaling.test_autoscaling_operator import NS, pods_controller
from tests.reconcile.conftest import (
    Cluster,
    cluster_body,
    condition,
    eventually,
    secret_body,
)
from tests.reconcile.ha_harness import (
    LEASE_NS,
    Candidate,
    LeaseEmulator,
    StatsServers,
    agent,
    api_server,
    config,
)

__all__ = ["api_server", "pods_controller"]  # fixtures
WAIT = 60.0  # generous: a loaded 2-core machine
LEASE_PATH = kube.REGISTRY["Lease"].path(LEASE_NS)  # the collection (create) and the lease
_clients: list[kube.KubeClient] = []


def client(url: str, identity: str) -> kube.KubeClient:
    made = kube.KubeClient(kopf.ConnectionInfo(server=url), user_agent=agent(identity))
    _clients.append(made)
    return made


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _clients:
        await _clients.pop().close()


def url_of(server: Any) -> str:
    return str(server.url).rstrip("/")


def lease_writes(server: Any, identity: str) -> list[Any]:
    return [r for r in list(server) if r.url.path.startswith(LEASE_PATH)
            and r.method.value in ("PATCH", "PUT", "POST")
            and identity in r.headers.get("User-Agent", "")]


# --- the election alone ------------------------------------------------------------------------

async def test_lease_is_created_renewed_and_released_under_preconditions(
        cluster: Cluster, api_server: LeaseEmulator) -> None:
    a = LeaderElector(client(url_of(api_server), "op-a"), config("op-a"))
    b = LeaderElector(client(url_of(api_server), "op-b"), config("op-b"))
    assert await a.try_acquire_or_renew()
    assert api_server.holder() == "op-a"
    assert not await b.try_acquire_or_renew()  # held and fresh
    assert b.holder == "op-a"
    for _ in range(3):
        assert await a.try_acquire_or_renew()
    lease = api_server.lease()
    assert lease is not None
    spec = lease["spec"]
    assert spec["leaseDurationSeconds"] == 3
    assert spec["leaseTransitions"] == 0
    assert spec["renewTime"].endswith("Z")
    assert "." in spec["renewTime"]  # MicroTime
    creates = [r for r in lease_writes(api_server, "op-a") if r.method.value == "POST"]
    patches = [r for r in lease_writes(api_server, "op-a") if r.method.value == "PATCH"]
    assert len(creates) == 1
    assert len(patches) == 3
    assert all(r.data["metadata"]["resourceVersion"] for r in patches)

    await a.release()
    assert api_server.holder() is None
    assert await b.try_acquire_or_renew()  # released: no need to wait for the expiry
    assert api_server.holder() == "op-b"
    assert api_server.lease()["spec"]["leaseTransitions"] == 1  # type: ignore[index]
    # A's renewal from its old view is refused by the precondition: it does not lead again.
    assert not await a.try_acquire_or_renew()
    assert api_server.holder() == "op-b"


async def test_candidates_racing_for_the_lease_never_both_win(
        cluster: Cluster, api_server: LeaseEmulator) -> None:
    names = [f"op-{i}" for i in range(6)]
    electors = [LeaderElector(client(url_of(api_server), n), config(n)) for n in names]
    won = await asyncio.gather(*(e.try_acquire_or_renew() for e in electors))
    assert sum(won) == 1, won
    leader = names[won.index(True)]
    assert api_server.holder() == leader
    # Again, with the lease existing: everyone reads it, the holder renews, nobody takes it.
    won = await asyncio.gather(*(e.try_acquire_or_renew() for e in electors))
    assert [n for n, w in zip(names, won, strict=True) if w] == [leader]
    # Once it is released, one candidate (only one) gets it.
    await electors[won.index(True)].release()
    assert api_server.holder() is None
    won = await asyncio.gather(*(e.try_acquire_or_renew() for e in electors))
    assert sum(won) == 1
    assert api_server.holder() == names[won.index(True)]


async def test_an_unrenewed_lease_is_taken_after_its_duration_not_before(
        cluster: Cluster, api_server: LeaseEmulator) -> None:
    cfg_a, cfg_b = config("op-a"), config("op-b")
    a = LeaderElector(client(url_of(api_server), "op-a"), cfg_a)
    b = LeaderElector(client(url_of(api_server), "op-b"), cfg_b)
    assert await a.try_acquire_or_renew()
    died = time.monotonic()  # A stops renewing without releasing (a crash)
    stop = asyncio.Event()
    assert await asyncio.wait_for(b.acquire(stop), WAIT)
    took = time.monotonic() - died
    # Never before the lease duration (measured from B's first sight of A's last renewal);
    # about one retry period after it (more on a loaded machine).
    assert took >= cfg_a.lease_duration - 0.05, took
    assert took <= cfg_a.lease_duration + 2.2 * cfg_b.retry_period + 3.0, took
    assert api_server.holder() == "op-b"


async def test_a_cut_off_leader_gives_up_within_its_renew_deadline(
        cluster: Cluster, api_server: LeaseEmulator) -> None:
    cfg = config("op-a")
    a = LeaderElector(client(url_of(api_server), "op-a"), cfg)
    b = LeaderElector(client(url_of(api_server), "op-b"), config("op-b"))
    stop = asyncio.Event()
    assert await a.acquire(stop)
    holding = asyncio.create_task(a.hold(stop))
    await asyncio.sleep(3 * cfg.retry_period)
    assert not holding.done()  # renewing fine
    api_server.cut_off.add("op-a")
    cut = time.monotonic()
    following = asyncio.create_task(b.acquire(stop))
    with pytest.raises(LeadershipLost):
        await asyncio.wait_for(holding, WAIT)
    gave_up = time.monotonic() - cut
    assert not a.is_leader
    assert await asyncio.wait_for(following, WAIT)
    taken = time.monotonic() - cut
    assert gave_up <= cfg.renew_deadline + cfg.retry_period + 2.0, gave_up
    # The follower waits the whole lease duration: A stopped (renew deadline) before B won.
    assert gave_up < taken, (gave_up, taken)
    assert taken >= cfg.lease_duration - cfg.retry_period - 0.05, taken


def test_lease_timings_are_checked_like_client_go() -> None:
    assert LeaseConfig("ns", "me").problems() == []  # 15 / 10 / 2
    assert LeaseConfig("ns", "me", lease_duration=10, renew_deadline=10).problems()
    assert LeaseConfig("ns", "me", renew_deadline=2, retry_period=2).problems()
    assert LeaseConfig("ns", "").problems()


# --- two real operators -------------------------------------------------------------------------

@pytest.fixture
async def candidates(api_server: LeaseEmulator, cluster: Cluster
                     ) -> AsyncIterator[dict[str, Candidate]]:
    url = url_of(api_server)
    made = {n: Candidate(url, config(n)) for n in ("op-a", "op-b")}
    yield made
    for candidate in made.values():
        await candidate.stop()


def writes_of(server: Any, identity: str, since: int = 0) -> list[int]:
    """Log positions of that candidate's writes through its own client, except to the lease."""
    return [i for i, r in enumerate(list(server)) if i >= since
            and r.method.value in ("POST", "PATCH", "PUT", "DELETE")
            and identity in r.headers.get("User-Agent", "")
            and not r.url.path.startswith(LEASE_PATH)]


def first_lease_write(server: Any, identity: str) -> int:
    """Where that candidate first wrote the lease: followers only read it, so this is where
    it took (or created) the lease."""
    return min(i for i, r in enumerate(list(server)) if r.url.path.startswith(LEASE_PATH)
               and r.method.value in ("PATCH", "POST")
               and identity in r.headers.get("User-Agent", ""))


async def test_only_the_leader_reconciles_and_a_clean_stop_hands_over_at_once(
        cluster: Cluster, api_server: LeaseEmulator, candidates: dict[str, Candidate]) -> None:
    a, b = candidates["op-a"], candidates["op-b"]
    slow = {"lease_duration": 15.0, "renew_deadline": 10.0, "retry_period": 0.5}
    a.election, b.election = config("op-a", **slow), config("op-b", **slow)
    await cluster.create(secret_body("ns1"))
    await cluster.create(cluster_body())
    a.start()
    await eventually(lambda: api_server.holder() == "op-a", WAIT)
    b.start()
    await eventually(lambda: condition(cluster.find("GpuProxyCluster", "ns1", "demo"), "Ready")
                     .get("status") == "True", WAIT)
    await asyncio.sleep(2 * b.election.retry_period)  # B has looked at the lease meanwhile
    assert api_server.holder() == "op-a"
    assert writes_of(api_server, "op-a")
    assert writes_of(api_server, "op-b") == []  # the follower never writes

    await a.stop()  # a clean stop (a rolling update): the lease is released
    released = time.monotonic()
    assert a.lost is None
    await eventually(lambda: api_server.holder() == "op-b", WAIT)
    handover = time.monotonic() - released
    # Far below the 15 s lease: the follower's next retry (0.5-1.1 s), more on a slow machine.
    assert handover < 8.0, handover
    mark = cluster.mark()
    await cluster.delete("ConfigMap", "ns1", "demo-proxy")  # B repairs drift now
    await eventually(lambda: cluster.find("ConfigMap", "ns1", "demo-proxy") is not None, WAIT)
    assert writes_of(api_server, "op-b", mark)
    assert writes_of(api_server, "op-a", mark) == []
    assert min(writes_of(api_server, "op-b")) > first_lease_write(api_server, "op-b")


async def _probe(port: int) -> dict[str, Any] | None:
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{port}/healthz", timeout=aiohttp.ClientTimeout(total=2)) as r:
            return dict(await r.json()) if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


async def test_a_follower_answers_liveness_probes(
        cluster: Cluster, api_server: LeaseEmulator) -> None:
    url = url_of(api_server)
    holder = LeaderElector(client(url, "op-x"), config("op-x", lease_duration=60.0,
                                                       renew_deadline=40.0))
    assert await holder.try_acquire_or_renew()
    port = free_port_on(["127.0.0.1"])
    follower = Candidate(url, config("op-c"), liveness_endpoint=f"http://127.0.0.1:{port}/healthz")
    follower.start()
    try:
        answer = None
        for _ in range(int(WAIT / 0.2)):
            answer = await _probe(port)
            if answer is not None:
                break
            await asyncio.sleep(0.2)
        assert answer == {"leader": False, "holder": "op-x"}
    finally:
        await follower.stop()
    assert follower.lost is None  # stopped as a follower
    assert await _probe(port) is None  # and the endpoint is gone with it
    assert writes_of(api_server, "op-c") == []


async def test_a_leader_cut_off_from_the_api_stops_by_itself_and_is_replaced(
        cluster: Cluster, api_server: LeaseEmulator, candidates: dict[str, Candidate]) -> None:
    a, b = candidates["op-a"], candidates["op-b"]
    await cluster.create(secret_body("ns1"))
    await cluster.create(cluster_body())
    a.start()
    await eventually(lambda: api_server.holder() == "op-a", WAIT)
    b.start()
    await eventually(lambda: condition(cluster.find("GpuProxyCluster", "ns1", "demo"), "Ready")
                     .get("status") == "True", WAIT)
    api_server.cut_off.add("op-a")  # its renewals fail from now on
    cut = time.monotonic()
    await eventually(lambda: not a.running, WAIT)  # no stop flag: it stopped on its own
    assert a.lost is not None
    assert "could not renew lease" in a.lost
    assert a.stopped_at is not None
    assert a.state is not None
    with pytest.raises(kube.Fenced):  # and refuses writes, whoever still holds the client
        await a.state.kube.patch("ConfigMap", "ns1", "demo-proxy", {})
    await eventually(lambda: api_server.holder() == "op-b", WAIT)
    taken = time.monotonic()
    cfg = config("op-a")
    assert a.stopped_at - cut <= cfg.renew_deadline + cfg.retry_period + 5.0
    assert a.stopped_at < taken  # A had stopped before B could take over
    assert taken - cut >= cfg.lease_duration - cfg.retry_period - 0.1


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """run.main configures the root logger: put it back for the tests after this one."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield
    root.handlers[:] = saved
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_a_lost_lease_exits_non_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kubelet restarts the container, which then waits as a follower."""
    async def lost(*_: Any, **__: Any) -> str:
        return "could not renew"

    monkeypatch.setattr(handlers, "run_operator", lost)
    args = build_parser("run").parse_args(["run", "--metrics-port", "0", "--liveness", "",
                                           "--identity", "me"])
    assert run.main(args) == 1
    monkeypatch.setattr(handlers, "run_operator", lambda *_, **__: asyncio.sleep(0))
    assert run.main(args) == 0


SCALE_UP = {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 15}]}


async def test_killing_the_leader_mid_scale_hands_over_without_a_double_scale(
        cluster: Cluster, api_server: LeaseEmulator, candidates: dict[str, Candidate],
        pods_controller: None) -> None:
    """240 connections on one pod, 80 per replica: the autoscaler wants 3 replicas, one more
    per 15 s. A scales 1 -> 2 and dies without releasing the lease; B takes over after about
    one lease duration, reads A's scale event from status.autoscalerState and waits out the
    rest of the 15 s before 2 -> 3 (a B without that memory would scale at once)."""
    a, b = candidates["op-a"], candidates["op-b"]
    port = free_port_on(POD_IPS)
    async with StatsServers(POD_IPS, port) as stats:
        stats.connections[POD_IPS[0]] = 240
        body = cluster_body("demo", NS, proxy={
            "replicas": 1, "adminPort": port, "connectionsPerReplica": 100,
            "backends": [{"name": "vllm-0", "url": "http://vllm-0.gpu.svc:8000"}]})
        body["spec"]["autoscaling"] = {
            "enabled": True, "minReplicas": 1, "maxReplicas": 4, "targetConnections": 400,
            "intervalSeconds": 5, "behavior": {"scaleUp": SCALE_UP}}
        await cluster.create(secret_body(NS))
        await cluster.create(body)
        assert handlers.load_autoscaling()
        a.start()
        await eventually(lambda: api_server.holder() == "op-a", WAIT)
        b.start()

        def replicas() -> int:
            dep = cluster.find("Deployment", NS, "demo-proxy")
            return int((dep or {}).get("spec", {}).get("replicas", 0))

        await eventually(lambda: replicas() == 2, WAIT)
        first_scale = time.monotonic()
        a.crash()
        killed, killed_at = time.monotonic(), cluster.mark()
        await eventually(lambda: api_server.holder() == "op-b", WAIT)
        handover = time.monotonic() - killed
        lease, retry = config("op-a").lease_duration, config("op-b").retry_period
        # Not before A's last renewal has aged a lease duration (A renewed at most one retry
        # period before it died); soon after (B's next retry, a slow machine).
        assert lease - retry - 0.1 <= handover <= lease + 2.2 * retry + 4.0, handover
        state = json.loads(cluster.get("GpuProxyCluster", NS, "demo")["status"]
                           ["autoscalerState"])
        assert [change for _, change in state["e"]] == [1]  # A's +1, kept in status

        seen: list[tuple[float, int]] = []

        def scaled_to_three() -> bool:
            seen.append((time.monotonic(), replicas()))
            return seen[-1][1] >= 3

        await eventually(scaled_to_three, WAIT)
        assert {r for _, r in seen} <= {2, 3}
        # B honoured the 15 s period that began with A's scale-up, rather than scaling at once.
        second_scale = seen[-1][0]
        assert second_scale - first_scale >= 15.0 - 1.0, second_scale - first_scale
        await asyncio.sleep(1.0)
        assert replicas() == 3
        scaled_up = [e["message"] for e in cluster.events(NS) if e["reason"] == "ScaledUp"]
        assert len(scaled_up) == 2, scaled_up
        # Never two writers: nothing from A once B holds the lease (a request A had on the
        # wire when it died may land a moment later), nothing from B before it took it.
        took_over = first_lease_write(api_server, "op-b")
        assert took_over > killed_at
        assert writes_of(api_server, "op-a", took_over) == []
        assert not [r for r in list(api_server)[killed_at:] if r.url.path.startswith(LEASE_PATH)
                    and r.method.value != "GET" and "op-a" in r.headers.get("User-Agent", "")]
        assert writes_of(api_server, "op-b")
        assert min(writes_of(api_server, "op-b")) > took_over
