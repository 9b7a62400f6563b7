"""The data plane's rendezvous against a process that reaches a member's store port (a TCPStore has no access
control: any process can list, read and write its keys). Real processes, real TCPStore and gloo on 127.0.0.1.

The rogue here knows more than a real one could: the members, their stores and hivemind's group id (so the
rendezvous prefix); only the run secret is missing. In an open run it joins the group, reads the members' sum and
adds its own tensor (the control: the attack works when nothing stops it). In a protected run it gets nothing in
and nothing out, a value it forges in the store is refused and counted, and a connection that cannot prove the
run's key is refused before any tensor moves.
"""

from __future__ import annotations

import datetime
import hashlib
import multiprocessing as mp
import time

import pytest
import torch
import torch.distributed as dist

from mesh import dataplane
from mesh.admission import Admission

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SECRET = "a-secret-of-at-least-16"
PEERS = [b"\x00\x24peer-a", b"\x00\x24peer-b", b"\x00\x24peer-c"]
ROUND = bytes(range(32))  # hivemind's group id, the same for every member
TIMEOUT = 3.0
ROGUE_VALUE = 1000.0


def members(port: int, count: int) -> list[tuple[bytes, dataplane.Endpoint]]:
    return [(peer, dataplane.Endpoint("127.0.0.1", port, 0)) for peer in PEERS[:count]]


def honest(index: int, port: int, count: int, secret: str | None, conn) -> None:
    """A member: builds its group through GroupCache, as the averager does, and all-reduces its index + 1."""
    cache = dataplane.GroupCache("127.0.0.1", TIMEOUT, Admission("run", secret))
    try:
        group, _rank = cache.get(members(port, count), PEERS[index], ROUND)
        tensor = torch.full((4,), float(index + 1))
        group.allreduce([tensor]).wait()
        conn.send(("summed", tensor.tolist(), cache.admission.refusals()["rendezvous"]))
    except Exception as err:  # noqa: BLE001 - what failed is the result
        conn.send(("failed", str(err), cache.admission.refusals()["rendezvous"]))


def rogue(port: int, count: int, conn) -> None:
    """Plain torch, the rendezvous prefix known: takes the last rank and all-reduces ROGUE_VALUE."""
    prefix = hashlib.sha256(repr(dataplane.membership(members(port, count))).encode() + ROUND).hexdigest()[:32]
    try:
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=TIMEOUT))
        options = dist.ProcessGroupGloo._Options()
        options._timeout = datetime.timedelta(seconds=TIMEOUT)
        options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        group = dist.ProcessGroupGloo(dist.PrefixStore(prefix, client), count - 1, count, options)
        tensor = torch.full((4,), ROGUE_VALUE)
        group.allreduce([tensor]).wait()
        conn.send(("summed", tensor.tolist(), 0))
    except Exception as err:  # noqa: BLE001
        conn.send(("failed", str(err), 0))


def start(target, *args) -> tuple[mp.Process, object]:
    ours, theirs = mp.Pipe()
    process = mp.get_context("fork").Process(target=target, args=(*args, theirs), daemon=True)
    process.start()
    return process, ours


def results(started: list) -> list[tuple]:
    got = []
    for process, conn in started:
        assert conn.poll(4 * TIMEOUT + 30), "a member hung past its rendezvous timeout"
        got.append(conn.recv())
        process.join(10)
    return got


@pytest.mark.parametrize("secret", [None, SECRET], ids=["open", "protected"])
def test_a_process_at_the_store_joins_an_open_group_but_gets_nothing_from_a_protected_one(secret: str | None) -> None:
    store = dataplane.StoreHost("127.0.0.1", TIMEOUT)
    try:
        began = time.monotonic()
        got = results([start(honest, i, store.port, 3, secret) for i in range(2)] + [start(rogue, store.port, 3)])
        elapsed = time.monotonic() - began
    finally:
        store.close()
    if secret is None:  # the control: nothing stops it, it reads the members' sum and adds its own
        assert [outcome for outcome, *_ in got] == ["summed"] * 3
        assert all(values == [1.0 + 2.0 + ROGUE_VALUE] * 4 for _, values, _ in got)
    else:
        assert [outcome for outcome, *_ in got] == ["failed"] * 3, got
        assert elapsed < 3 * TIMEOUT + 15  # a failed build is bounded by the rendezvous timeout, never a hang


def test_a_protected_group_without_the_rogue_builds_verifies_and_sums() -> None:
    store = dataplane.StoreHost("127.0.0.1", TIMEOUT)
    try:
        got = results([start(honest, i, store.port, 3, SECRET) for i in range(3)])
    finally:
        store.close()
    assert got == [("summed", [6.0] * 4, 0)] * 3


def test_a_value_forged_in_a_protected_store_fails_the_build_and_is_counted() -> None:
    store = dataplane.StoreHost("127.0.0.1", TIMEOUT)
    spy = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=TIMEOUT))
    try:
        first = start(honest, 0, store.port, 2, SECRET)
        deadline = time.monotonic() + 10
        while not spy.list_keys() and time.monotonic() < deadline:  # member 0 has published its sealed address
            time.sleep(0.01)
        (name,) = spy.list_keys()
        spy.set(name, b"\x00" * 200)  # the rogue's own "address" in its place
        second = start(honest, 1, store.port, 2, SECRET)
        (outcome_0, detail_0, refused_0), (outcome_1, detail, refused_1) = results([first, second])
    finally:
        store.close()
    assert (outcome_0, outcome_1) == ("failed", "failed")
    assert "not written by a member" in detail and refused_1 == 1  # member 1 read the forged value and counted it
    # member 0 counts one only if it met the forged value too: gloo's rendezvous reads every rank's key back, its
    # own included, and under load the forgery can land between member 0's write and that read (seen in CI); else
    # its build fails when member 1 never connects, which is no forgery and not counted
    assert refused_0 == ("not written by a member" in detail_0), (detail_0, refused_0)


def prover(rank: int, port: int, key: bytes, conn) -> None:
    """A member of a plain gloo group (its connections already made) that proves ``key`` to the others."""
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=TIMEOUT))
    options = dist.ProcessGroupGloo._Options()
    options._timeout = datetime.timedelta(seconds=TIMEOUT)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    group = dist.ProcessGroupGloo(dist.PrefixStore("pairs", client), rank, 3, options)
    conn.send(dataplane.verify_pairs(group, PEERS, key, ROUND))


def test_a_connection_that_cannot_prove_the_runs_key_is_named_by_every_member() -> None:
    """What protects a group whose store was not the way in (a process that raced a member's connection to a gloo
    port): every pair proves the run's key over its own connection before any tensor moves."""
    key = Admission("run", SECRET).subkey("data-plane pairs")
    wrong = Admission("run", SECRET + "-not").subkey("data-plane pairs")
    store = dataplane.StoreHost("127.0.0.1", TIMEOUT)
    try:
        got = results([start(prover, rank, store.port, key if rank < 2 else wrong) for rank in range(3)])
    finally:
        store.close()
    assert got == [[2], [2], [0, 1]]
