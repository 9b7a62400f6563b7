"""The store contract (``api.store.base.Store``): every test runs against both stores and checks what they store."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone

import pytest

from api.models import Event, Heartbeat, HistoryPoint, Hyperparameters, Peer, Run, RunProgress
from api.store.base import Conflict, NotFound, Store, Unavailable
from api.store.mongo import MongoStore
from tests.contract.conftest import PrivateSecantus

T0 = datetime(2025, 3, 4, 5, 6, 7, 123000, tzinfo=timezone.utc)  # whole milliseconds: stored as given
BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_run(run_id: str, at: datetime = T0, **fields: object) -> Run:
    return Run.model_validate({"run_id": run_id, "task": "regression", "created_at": at, "updated_at": at} | fields)


def peer_id(i: int) -> str:
    """A valid libp2p-looking id; ids sort like ``i`` (base58 digits in alphabet order)."""
    return "12D3KooW" + "".join(BASE58[(i // 58**k) % 58] for k in (2, 1, 0)) + "x" * 16


def beat(run_id: str = "r1", **fields: object) -> Heartbeat:
    defaults: dict = {"addrs": ["/ip4/127.0.0.1/tcp/4001"], "host": "box", "device": "cpu", "version": "0.1.0"}
    return Heartbeat(run_id=run_id, **(defaults | fields))


def expected_peer(pid: str, b: Heartbeat, joined_at: datetime, last_seen: datetime, **fields: object) -> Peer:
    kept = b.model_dump(include=set(Peer.model_fields))  # the heartbeat's task is not part of the peer
    return Peer(peer_id=pid, **kept, joined_at=joined_at, last_seen=last_seen, **fields)


def event(run_id: str | None, at: datetime, kind: str = "peer_joined") -> Event:
    return Event(event_id=uuid.uuid4().hex, run_id=run_id, kind=kind, message=f"{kind} at {at.isoformat()}", time=at)


# lifecycle


async def test_open_is_idempotent_and_ping_answers(store: Store) -> None:
    await store.open()
    await store.ping()
    await store.close()
    with pytest.raises(Unavailable):
        await store.ping()


# runs


async def test_create_then_get_run(store: Store) -> None:
    run = make_run("r1", hyperparameters=Hyperparameters(batch_size=8, lr=0.01, compression="fp16"), max_peers=4)
    assert await store.create_run(run) == run
    assert await store.get_run("r1") == run


async def test_duplicate_run_is_conflict_and_keeps_the_first(store: Store) -> None:
    first = make_run("r1")
    await store.create_run(first)
    with pytest.raises(Conflict):
        await store.create_run(make_run("r1", t(1), task="demo"))
    assert await store.get_run("r1") == first


async def test_unknown_ids_are_not_found(store: Store) -> None:
    for call in (
        lambda: store.get_run("nope"),
        lambda: store.set_run_status("nope", "running", T0),
        lambda: store.update_run_progress("nope", RunProgress(), T0),
        lambda: store.get_peer(peer_id(1)),
        lambda: store.leave(peer_id(1), T0),
    ):
        with pytest.raises(NotFound):
            await call()


async def test_list_runs_newest_first_filtered_and_paged(store: Store) -> None:
    for i in range(5):
        await store.create_run(make_run(f"r{i}", t(i), status="running" if i % 2 else "created"))
    await store.create_run(make_run("r4b", t(4)))  # same created_at as r4: run id breaks the tie

    runs, total = await store.list_runs(None, 10, 0)
    assert [r.run_id for r in runs] == ["r4", "r4b", "r3", "r2", "r1", "r0"] and total == 6
    assert runs[0] == make_run("r4", t(4))

    runs, total = await store.list_runs(None, 2, 2)
    assert [r.run_id for r in runs] == ["r3", "r2"] and total == 6

    runs, total = await store.list_runs("running", 10, 0)
    assert [r.run_id for r in runs] == ["r3", "r1"] and total == 2

    runs, total = await store.list_runs("created", 1, 1)
    assert [r.run_id for r in runs] == ["r4b"] and total == 4

    assert await store.list_runs(None, 10, 6) == ([], 6)
    assert await store.list_runs(None, 0, 0) == ([], 6)
    assert await store.list_runs("failed", 10, 0) == ([], 0)


async def test_run_status_transitions(store: Store) -> None:
    run = await store.create_run(make_run("r1"))

    running = await store.set_run_status("r1", "running", t(1))
    assert running == run.model_copy(update={"status": "running", "updated_at": t(1)})
    assert await store.get_run("r1") == running

    stopped = await store.set_run_status("r1", "stopped", t(2))
    assert stopped == running.model_copy(update={"status": "stopped", "updated_at": t(2), "stopped_at": t(2)})
    assert await store.get_run("r1") == stopped

    for status in ("running", "created", "finished", "failed"):
        with pytest.raises(Conflict):
            await store.set_run_status("r1", status, t(3))
    assert await store.set_run_status("r1", "stopped", t(4)) == stopped  # same end state: a no-op
    assert await store.get_run("r1") == stopped


@pytest.mark.parametrize("end", ["finished", "failed"])
async def test_run_may_end_straight_from_created(store: Store, end: str) -> None:
    run = await store.create_run(make_run("r1"))
    ended = await store.set_run_status("r1", end, t(5))  # type: ignore[arg-type]
    assert ended == run.model_copy(update={"status": end, "updated_at": t(5), "stopped_at": t(5)})
    assert await store.get_run("r1") == ended


async def test_progress_moves_created_to_running(store: Store) -> None:
    run = await store.create_run(make_run("r1"))
    first = RunProgress(epoch=1, samples=512, loss=2.5, samples_per_second=100.0, peers_alive=2)
    updated = await store.update_run_progress("r1", first, t(1))
    assert updated == run.model_copy(update={"status": "running", "progress": first, "updated_at": t(1)})
    assert await store.get_run("r1") == updated

    second = RunProgress(epoch=2, samples=1024, loss=None, samples_per_second=90.0, peers_alive=1)
    assert (await store.update_run_progress("r1", second, t(2))).progress == second

    await store.set_run_status("r1", "finished", t(3))
    final = await store.update_run_progress("r1", first, t(4))
    assert (final.status, final.progress, final.stopped_at) == ("finished", first, t(3))
    assert await store.get_run("r1") == final


# history


async def test_history_is_unique_per_epoch_ascending_and_keeps_the_last(store: Store) -> None:
    points = {e: HistoryPoint(run_id="r1", epoch=e, loss=5.0 - e, samples_per_second=10.0 * e, peers=2, time=t(e)) for e in (2, 0, 1, 3)}
    for point in points.values():
        assert await store.add_history(point) is True
    assert await store.add_history(HistoryPoint(run_id="r2", epoch=1, time=t(9))) is True
    assert await store.add_history(points[1].model_copy(update={"loss": 99.0})) is False

    assert await store.list_history("r1", 10) == [points[e] for e in (0, 1, 2, 3)]
    # fewer points than recorded: spread over the whole run, the first and the last epoch kept
    assert await store.list_history("r1", 2) == [points[0], points[3]]
    assert await store.list_history("r1", 1) == [points[3]]
    assert await store.list_history("r2", 10) == [HistoryPoint(run_id="r2", epoch=1, time=t(9))]
    assert await store.list_history("r3", 10) == []


async def test_a_long_runs_history_is_spread_over_the_whole_run_not_capped_at_its_end(store: Store) -> None:
    """Issue 10: both stores clamped the history to the last 500 points, so the charts lost a long run's start."""
    recorded = [e for e in range(0, 600) if e % 7 != 3]  # 514 epochs, with the gaps heartbeats leave (the cap was 500)
    for e in recorded:
        await store.add_history(HistoryPoint(run_id="long", epoch=e, loss=1.0 / (e + 1), time=t(0)))
    assert [p.epoch for p in await store.list_history("long", 5000)] == recorded  # more than 500 when asked
    sampled = [p.epoch for p in await store.list_history("long", 50)]
    assert len(sampled) == 50 and sampled[0] == 0 and sampled[-1] == recorded[-1] and sampled == sorted(set(sampled))
    gaps = [b - a for a, b in zip(sampled, sampled[1:])]
    assert max(gaps) <= 2 * len(recorded) / 49 + 2  # evenly spread, not clumped at one end


# peers


async def test_heartbeat_is_an_idempotent_upsert(store: Store) -> None:
    pid, first = peer_id(1), beat(epoch=1)
    peer, joined = await store.heartbeat(pid, first, t(0))
    assert joined is True
    assert peer == expected_peer(pid, first, t(0), t(0))
    assert await store.get_peer(pid) == peer

    again, joined = await store.heartbeat(pid, first, t(0))
    assert joined is False and again == peer

    later = beat(epoch=3, samples_per_second=42.0, loss=1.5, gpu_name="H100", addrs=[])
    peer, joined = await store.heartbeat(pid, later, t(5), source="dht")
    assert joined is False
    assert peer == expected_peer(pid, later, t(0), t(5), source="dht")
    assert await store.get_peer(pid) == peer
    assert await store.list_peers(None, None, 10, 0) == ([peer], 1)


async def test_left_or_lost_peer_rejoins_on_heartbeat(store: Store) -> None:
    pid, b = peer_id(1), beat()
    await store.heartbeat(pid, b, t(0))

    left = await store.leave(pid, t(1))
    assert left == expected_peer(pid, b, t(0), t(0), status="left", left_at=t(1))
    assert await store.get_peer(pid) == left

    peer, joined = await store.heartbeat(pid, b, t(2))
    assert joined is True and peer == expected_peer(pid, b, t(2), t(2))

    assert await store.mark_lost(t(3), t(4)) == [expected_peer(pid, b, t(2), t(2), status="lost", left_at=t(4))]
    peer, joined = await store.heartbeat(pid, b, t(5))
    assert joined is True and peer == expected_peer(pid, b, t(5), t(5))
    assert await store.get_peer(pid) == peer


async def test_list_peers_filters_pages_and_orders_by_join_time(store: Store) -> None:
    # joined_at: p3 at 0; p1, p2 at 1 (peer id breaks the tie); p4 at 2 in run r2; p5 at 3 then left.
    for i, run_id, at in ((3, "r1", 0), (2, "r1", 1), (1, "r1", 1), (4, "r2", 2), (5, "r1", 3)):
        await store.heartbeat(peer_id(i), beat(run_id), t(at))
    await store.leave(peer_id(5), t(4))

    def ids(peers: list[Peer]) -> list[str]:
        return [p.peer_id for p in peers]

    peers, total = await store.list_peers(None, None, 10, 0)
    assert ids(peers) == [peer_id(i) for i in (3, 1, 2, 4, 5)] and total == 5
    peers, total = await store.list_peers("r1", None, 2, 1)
    assert ids(peers) == [peer_id(1), peer_id(2)] and total == 4
    peers, total = await store.list_peers("r1", "alive", 10, 0)
    assert ids(peers) == [peer_id(i) for i in (3, 1, 2)] and total == 3
    peers, total = await store.list_peers(None, "left", 10, 0)
    assert peers == [expected_peer(peer_id(5), beat("r1"), t(3), t(3), status="left", left_at=t(4))] and total == 1
    assert await store.list_peers("r2", "lost", 10, 0) == ([], 0)
    assert await store.list_peers(None, None, 0, 0) == ([], 5)
    assert await store.list_peers(None, None, 10, 5) == ([], 5)


async def test_mark_lost_takes_only_alive_peers_seen_before_the_cutoff(store: Store) -> None:
    for i, seen in ((1, 0), (2, 10), (3, 15), (4, 20), (5, 0)):
        await store.heartbeat(peer_id(i), beat(), t(seen))
    await store.leave(peer_id(5), t(1))

    lost = await store.mark_lost(t(15), t(30))
    assert lost == [expected_peer(peer_id(i), beat(), t(s), t(s), status="lost", left_at=t(30)) for i, s in ((1, 0), (2, 10))]
    for peer in lost:
        assert await store.get_peer(peer.peer_id) == peer
    assert (await store.get_peer(peer_id(3))).status == "alive"  # last_seen == cutoff is not before it
    assert (await store.get_peer(peer_id(4))).status == "alive"
    assert await store.get_peer(peer_id(5)) == expected_peer(peer_id(5), beat(), t(0), t(0), status="left", left_at=t(1))
    assert await store.mark_lost(t(15), t(31)) == []


async def test_count_peers_by_run_and_status(store: Store) -> None:
    assert await store.count_peers() == {}
    for i, run_id in ((1, "r1"), (2, "r1"), (3, "r1"), (4, "r2")):
        await store.heartbeat(peer_id(i), beat(run_id), t(i))
    await store.leave(peer_id(1), t(5))
    await store.mark_lost(t(3), t(6))  # p2
    assert await store.count_peers() == {("r1", "left"): 1, ("r1", "lost"): 1, ("r1", "alive"): 1, ("r2", "alive"): 1}


# events


async def test_events_newest_first_filtered_and_paged(store: Store) -> None:
    e0, e1 = event("r1", t(0), "run_created"), event(None, t(1), "coordinator_started")
    e2, e3, e4 = event("r1", t(2)), event("r2", t(3)), event("r1", t(2), "peer_left")  # e4 ties e2, added later
    for e in (e0, e1, e2, e3, e4):
        assert await store.add_event(e) is None

    assert await store.list_events(None, 10, 0) == ([e3, e4, e2, e1, e0], 5)
    assert await store.list_events(None, 2, 1) == ([e4, e2], 5)
    assert await store.list_events("r1", 10, 0) == ([e4, e2, e0], 3)
    assert await store.list_events("r1", 1, 2) == ([e0], 3)
    assert await store.list_events("r3", 10, 0) == ([], 0)
    assert await store.list_events(None, 0, 0) == ([], 5)


# times, persistence, concurrency


async def test_times_are_tz_aware_utc_milliseconds(store: Store) -> None:
    plus2 = timezone(timedelta(hours=2))
    local = datetime(2025, 3, 4, 7, 6, 7, 123456, tzinfo=plus2)  # = T0 plus 456 µs
    created = await store.create_run(make_run("r1", local))
    assert created.created_at == T0 and created.created_at.utcoffset() == timedelta(0)
    fetched = await store.get_run("r1")
    assert fetched == created
    assert all(at.utcoffset() == timedelta(0) for at in (fetched.created_at, fetched.updated_at))

    naive = datetime(2025, 3, 4, 5, 6, 8, 123999)  # naive is UTC
    stopped = await store.set_run_status("r1", "stopped", naive)
    assert stopped.stopped_at == t(1) and (await store.get_run("r1")).stopped_at == t(1)

    peer, _ = await store.heartbeat(peer_id(1), beat(), local)
    assert peer.joined_at == T0 and (await store.get_peer(peer_id(1))).last_seen.utcoffset() == timedelta(0)
    await store.add_history(HistoryPoint(run_id="r1", epoch=0, time=local))
    assert (await store.list_history("r1", 1))[0].time == T0
    await store.add_event(event("r1", local))
    assert (await store.list_events("r1", 1, 0))[0][0].time == T0


async def test_non_finite_numbers_are_kept(store: Store) -> None:
    # A diverging peer may report loss=NaN and an absurd rate; pydantic accepts both from JSON bodies.
    peer, _ = await store.heartbeat(peer_id(1), beat(loss=math.nan, samples_per_second=math.inf), t(0))
    stored_peer = await store.get_peer(peer_id(1))
    assert math.isnan(stored_peer.loss or 0.0) and stored_peer.samples_per_second == math.inf
    await store.create_run(make_run("r1"))
    run = await store.update_run_progress("r1", RunProgress(loss=-math.inf, samples_per_second=math.inf), t(1))
    assert (await store.get_run("r1")).progress == run.progress
    await store.add_history(HistoryPoint(run_id="r1", epoch=0, loss=math.nan, time=t(1)))
    assert math.isnan((await store.list_history("r1", 1))[0].loss or 0.0)


async def test_everything_survives_close_and_reopen(store: Store, open_store: Callable[[], Awaitable[Store]]) -> None:
    run = await store.create_run(make_run("r1"))
    run = await store.update_run_progress("r1", RunProgress(epoch=1, loss=2.0), t(1))
    point = HistoryPoint(run_id="r1", epoch=1, loss=2.0, time=t(1))
    await store.add_history(point)
    peer, _ = await store.heartbeat(peer_id(1), beat(), t(1))
    e = event("r1", t(1))
    await store.add_event(e)
    await store.close()

    reopened = await open_store()
    assert await reopened.get_run("r1") == run
    assert await reopened.list_history("r1", 10) == [point]
    assert await reopened.add_history(point) is False  # the unique index survived too
    assert await reopened.get_peer(peer_id(1)) == peer
    assert await reopened.list_events(None, 10, 0) == ([e], 1)
    _, joined = await reopened.heartbeat(peer_id(1), beat(), t(2))
    assert joined is False


async def test_concurrent_heartbeats_all_land(store: Store) -> None:
    results = await asyncio.gather(*(store.heartbeat(peer_id(i), beat(epoch=i), t(0)) for i in range(50)))
    assert all(joined for _, joined in results)
    peers, total = await store.list_peers("r1", "alive", 100, 0)
    assert total == 50
    assert peers == [expected_peer(peer_id(i), beat(epoch=i), t(0), t(0)) for i in range(50)]

    # Racing first heartbeats of one peer: exactly one of them joins it.
    results = await asyncio.gather(*(store.heartbeat(peer_id(99), beat(), t(1)) for _ in range(10)))
    assert sorted(joined for _, joined in results) == [False] * 9 + [True]
    assert (await store.count_peers())[("r1", "alive")] == 51


# MongoDB outage (a private SecantusDB server that the test stops and starts again)


async def test_mongo_store_answers_unavailable_then_recovers(private_secantus: PrivateSecantus) -> None:
    store = MongoStore(private_secantus.uri, "outage")
    await store.open()
    try:
        before = await store.create_run(make_run("before", t(0)))
        await asyncio.to_thread(private_secantus.stop)

        for attempt in (store.ping, lambda: store.create_run(make_run("during", t(1)))):
            started = time.monotonic()
            with pytest.raises(Unavailable) as caught:
                await attempt()
            assert time.monotonic() - started < 6, "an outage must answer within about timeout_ms"
            assert "\n" not in str(caught.value) and "unreachable" in str(caught.value)

        await asyncio.to_thread(private_secantus.start)
        deadline = time.monotonic() + 10
        while True:  # the driver's monitor finds the server again by itself; allow it a moment
            try:
                await store.ping()
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
        assert await store.get_run("before") == before
        after = await store.create_run(make_run("after", t(2)))
        assert await store.list_runs(None, 10, 0) == ([after, before], 2)  # nothing of "during" was written
    finally:
        await store.close()
