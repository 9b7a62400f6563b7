"""``--join http://bootstrap:9100/healthz``: the bootstrap's addresses read from its health URL (how compose and
Kubernetes name the bootstrap before its peer id is known), and the container health probe."""

from __future__ import annotations

import json

import pytest

from mesh import probe
from mesh.errors import JoinError
from mesh.join_url import resolve as resolve_join
from tests.procs import http_server

PEER_ID = "12D3KooWSB3L5TWVTFUmLUg2LRtbYVZtYCjmsACqFCiXUvLF9sJ8"
ADDR = f"/dns4/mesh-bootstrap-0.mesh-bootstrap/tcp/31337/p2p/{PEER_ID}"


@pytest.fixture
def server():
    """``replies`` is the queue of (status, body) the server answers with; ``seen`` the paths it was asked."""
    replies: list[tuple[int, bytes]] = []
    seen: list[str] = []
    with http_server(replies, seen) as base:
        yield base, replies, seen


def test_multiaddrs_pass_through_unchanged():
    assert resolve_join((ADDR, "/ip4/10.0.0.1/tcp/1/p2p/" + PEER_ID), timeout=1) == [ADDR, "/ip4/10.0.0.1/tcp/1/p2p/" + PEER_ID]


def test_health_url_gives_the_bootstraps_addrs(server):
    base, replies, seen = server
    replies.append((200, json.dumps({"status": "ok", "peer_id": PEER_ID, "addrs": [ADDR]}).encode()))
    other = "/ip4/10.0.0.2/tcp/2/p2p/" + PEER_ID
    assert resolve_join((f"{base}/healthz", other), timeout=5) == [ADDR, other]
    assert seen == ["/healthz"]


def test_health_url_is_retried_while_the_bootstrap_starts(server):
    base, replies, seen = server
    replies += [(503, b"starting"), (200, b"not json"), (200, json.dumps({"addrs": [ADDR]}).encode())]
    assert resolve_join((f"{base}/healthz",), timeout=10) == [ADDR]
    assert len(seen) == 3


@pytest.mark.parametrize("body", [b"{}", b'{"addrs": []}', b"<html>", b'{"addrs": "x"}', b'{"addrs": [1]}', b"[]"])
def test_a_url_that_is_not_a_bootstraps_health_fails_clearly(server, body):
    base, replies, _ = server
    replies.append((200, body))
    with pytest.raises(JoinError, match=r"could not read the bootstrap's addresses from http://127\.0\.0\.1:\d+/x within 1s"):
        resolve_join((f"{base}/x",), timeout=1)


def test_one_dead_url_is_skipped_when_other_entries_give_addresses():
    from mesh.up import free_port

    assert resolve_join((f"http://127.0.0.1:{free_port()}/healthz", ADDR), timeout=1) == [ADDR]


def test_nothing_listening_fails_within_the_timeout():
    from mesh.up import free_port

    with pytest.raises(JoinError, match="is the bootstrap running"):
        resolve_join((f"http://127.0.0.1:{free_port()}/healthz",), timeout=1)


def test_probe_reads_the_port_from_the_same_variables_as_the_process():
    assert probe.url_for("metrics", {}) == "http://127.0.0.1:9100/healthz"
    assert probe.url_for("metrics", {"MESH_METRICS_PORT": "9200"}) == "http://127.0.0.1:9200/healthz"
    assert probe.url_for("api", {"MESH_PORT": "18080"}) == "http://127.0.0.1:18080/api/v1/health"


def test_probe_exit_codes(server, monkeypatch, capsys):
    base, replies, _ = server
    port = base.rsplit(":", 1)[1]
    monkeypatch.setenv("MESH_METRICS_PORT", port)
    replies.append((200, b"{}"))
    assert probe.main(["metrics"]) == 0
    replies[0] = (503, b"{}")
    assert probe.main(["metrics"]) == 1
    assert probe.main(["nonsense"]) == 2
    from mesh.up import free_port

    monkeypatch.setenv("MESH_METRICS_PORT", str(free_port()))
    assert probe.main(["metrics"]) == 1
    assert "unhealthy" in capsys.readouterr().err
