"""Multiaddr validation: every malformed join address gets one line that says what is expected."""

from __future__ import annotations

import pytest

from mesh.dht import parse_multiaddr
from mesh.errors import JoinError

PEER_ID = "12D3KooWSB3L5TWVTFUmLUg2LRtbYVZtYCjmsACqFCiXUvLF9sJ8"


@pytest.mark.parametrize(
    "text",
    [
        f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}",
        f"/ip6/::1/tcp/31337/p2p/{PEER_ID}",
        f"/dns4/bootstrap.mesh.svc/tcp/31337/p2p/{PEER_ID}",
        f"  /ip4/10.0.0.1/tcp/1/p2p/{PEER_ID}  ",
    ],
)
def test_valid(text: str) -> None:
    maddr = parse_multiaddr(text)
    assert maddr.value_for_protocol("p2p") == PEER_ID


@pytest.mark.parametrize(
    "text, reason",
    [
        ("garbage", "Must begin with /"),
        ("127.0.0.1:31337", "Must begin with /"),
        ("/ip4/999.0.0.1/tcp/1/p2p/" + PEER_ID, "invalid multiaddr"),
        ("/ip4/127.0.0.1/tcp/31337", "no /p2p/PEERID"),
        (f"/ip4/127.0.0.1/p2p/{PEER_ID}", "no /tcp/PORT"),
        (f"/tcp/31337/p2p/{PEER_ID}", "must start with a host"),
        ("/ip4/127.0.0.1/tcp/31337/p2p/notapeerid", "invalid multiaddr"),
        (f"/ip4/127.0.0.1/tcp/0/p2p/{PEER_ID}", "port 0 out of range"),
    ],
)
def test_invalid(text: str, reason: str) -> None:
    with pytest.raises(JoinError) as info:
        parse_multiaddr(text)
    message = str(info.value)
    assert reason in message
    assert "expected /ip4/HOST/tcp/PORT/p2p/PEERID" in message
    assert "\n" not in message
