"""The data plane's sealed rendezvous store (mesh/dataplane.py, SealedStore) over a real TCPStore, read and written
by a plain client as any process that reaches the store's port can: it must see neither names nor values, and
nothing it writes, or moves from one name to another, may open."""

from __future__ import annotations

import datetime

import pytest
import torch.distributed as dist

from mesh.admission import Admission
from mesh.dataplane import SealedStore

KEY = Admission("run", "a-secret-of-at-least-16").subkey("data-plane store")
ADDRESS = b"\x7f\x00\x00\x01 rank 0's gloo address, port 41234"


@pytest.fixture
def server() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=5))


def outsider(server: dist.TCPStore) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=datetime.timedelta(seconds=5))


def test_members_read_what_members_wrote_and_an_outsider_sees_only_opaque_names_and_ciphertext(server) -> None:
    writer, reader = SealedStore(outsider(server), KEY), SealedStore(outsider(server), KEY)
    writer.set("prefix/0/0", ADDRESS)
    reader.wait(["prefix/0/0"], datetime.timedelta(seconds=5))
    assert reader.check(["prefix/0/0"])
    assert reader.get("prefix/0/0") == ADDRESS
    spy = outsider(server)
    (name,) = spy.list_keys()
    assert "prefix" not in name and "/0/0" not in name
    sealed = spy.get(name)
    assert len(sealed) == 12 + len(ADDRESS) + 16  # nonce, ciphertext, tag
    assert ADDRESS not in sealed and b"\x7f\x00\x00\x01" not in sealed and b"41234" not in sealed


def test_a_value_an_outsider_wrote_or_moved_does_not_open_and_is_counted(server) -> None:
    member = SealedStore(outsider(server), KEY)
    member.set("prefix/0/0", ADDRESS)
    member.set("prefix/0/1", b"rank 1's address")
    spy = outsider(server)
    names = {member._name("prefix/0/0"): "prefix/0/0", member._name("prefix/0/1"): "prefix/0/1"}
    assert set(spy.list_keys()) == set(names)
    first, second = sorted(names, key=names.get)
    spy.set(second, spy.get(first))  # a genuine value, replayed under another name
    with pytest.raises(RuntimeError, match="not written by a member"):
        member.get("prefix/0/1")
    spy.set(first, b"\x00" * 60)  # forged outright
    with pytest.raises(RuntimeError, match="not written by a member"):
        member.get("prefix/0/0")
    assert member.forged == 2


def test_another_runs_key_cannot_open_the_values() -> None:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=5))
    SealedStore(outsider(server), KEY).set("k", ADDRESS)
    other = Admission("run", "another-secret-of-16-chars").subkey("data-plane store")
    assert other is not None and other != KEY
    stranger = SealedStore(outsider(server), other)
    assert not stranger.check(["k"])  # its name for "k" is another name
    assert Admission("run").subkey("data-plane store") is None  # an open run has no key: the store stays plain
