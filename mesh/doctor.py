"""``mesh doctor``: preflight checks in plain words. Each check prints one line: ok, warn or FAIL."""

from __future__ import annotations

import ipaddress
import time
from functools import partial

from hivemind.dht.protocol import DHTProtocol
from hivemind.p2p import PeerID
from hivemind.proto import dht_pb2

from mesh import join_url
from mesh.config import DoctorConfig, NetworkConfig
from mesh.dht import parse_multiaddr, start_dht, visible_maddrs
from mesh.errors import MeshError


def _say(status: str, message: str) -> None:
    print(f"[{status:>4}] {message}", flush=True)


def _address_kind(maddr: str) -> str:
    parts = maddr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return "name"
    ip = ipaddress.ip_address(parts[2])
    return "loopback" if ip.is_loopback else "private" if ip.is_private else "public"


async def _ping_back(_dht, node, *, peer_id: PeerID, timeout: float):
    """Ask a DHT peer to ping us back: ``available`` tells whether it can open a connection to this host."""
    protocol: DHTProtocol = node.protocol
    request = dht_pb2.PingRequest(peer=protocol.node_info, validate=True)
    response = await protocol.get_stub(peer_id).rpc_ping(request, timeout=timeout)
    # plain values: the result crosses a process boundary, and protobuf messages do not pickle
    return bool(response.peer.node_id), float(response.dht_time), bool(response.available)


def _check_bootstrap(config: DoctorConfig, maddr, fail: str = "FAIL") -> int:
    """Join through one address, then ask that peer to connect back to us. Returns the number of failures;
    ``fail`` is how a failure is printed (``warn`` while other addresses of the same bootstrap remain to try)."""
    joined = NetworkConfig(
        join=(str(maddr),), host=config.host, port=config.port, announce=config.announce, join_timeout=config.join_timeout
    )
    try:
        dht = start_dht(joined, require_join=False)
    except MeshError:
        _say(fail, f"the bootstrap at {maddr} does not answer within {config.join_timeout:g}s; is it running, and is its port open?")
        return 1
    try:
        peer_id = PeerID.from_base58(maddr.value_for_protocol("p2p"))
        sent = time.monotonic()
        try:
            future = dht.run_coroutine(partial(_ping_back, peer_id=peer_id, timeout=config.join_timeout), return_future=True)
            answered, remote_time, available = future.result(config.join_timeout + 5)
        except Exception as err:
            _say(fail, f"the bootstrap at {maddr} does not answer ({type(err).__name__}: {err}); is it running, and is its port open?")
            return 1
        if not answered:
            _say(fail, f"the bootstrap at {maddr} does not answer; is it running, and is its port open?")
            return 1
        _say("ok", f"the bootstrap answers ({(time.monotonic() - sent) * 1000:.0f} ms round trip)")
        skew = abs(remote_time - time.time()) if remote_time else 0.0
        if skew > 5:
            _say("warn", f"clocks differ by {skew:.0f}s from the bootstrap: sync this host's clock (NTP)")
        if available:
            _say("ok", "this host is reachable from the bootstrap: it can be a full peer")
        else:
            _say(
                "warn",
                "the bootstrap cannot connect back to this host: forward the port and pass --announce "
                "/ip4/PUBLIC_IP/tcp/PORT, or join with --client-mode (relays carry the traffic)",
            )
        return 0
    finally:
        dht.shutdown()


def run(config: DoctorConfig) -> int:
    failures = 0
    # Each --join entry is one bootstrap: a multiaddr, or a health URL whose addresses are alternatives (its
    # loopback and container addresses may not be reachable from here; one that answers is enough).
    groups = []
    for entry in config.join:
        try:
            addrs = join_url.fetch_addrs(entry, config.join_timeout) if join_url.is_url(entry) else [entry]
        except MeshError as err:
            _say("FAIL", str(err))
            failures += 1
            continue
        group = []
        for addr in addrs:
            try:
                group.append(parse_multiaddr(addr))
                _say("ok", f"address parses: {addr}")
            except MeshError as err:
                _say("FAIL", str(err))
                failures += 1
        groups.append(group)
    if failures:
        return 1

    started = time.monotonic()
    alone = NetworkConfig(host=config.host, port=config.port, announce=config.announce, join_timeout=config.join_timeout)
    try:
        probe = start_dht(alone, require_join=False)
    except MeshError as err:
        _say("FAIL", f"the libp2p daemon did not start: {err}")
        return 1
    _say("ok", f"the libp2p daemon starts ({time.monotonic() - started:.1f}s), peer id {probe.peer_id}")
    addrs = visible_maddrs(probe)
    kinds = {_address_kind(a) for a in addrs}
    _say("ok", f"listening on {', '.join(addrs) or 'nothing'}")
    probe.shutdown()

    if not groups:
        _say("warn", "no --join given: only local checks were run")
    for group in groups:
        for i, maddr in enumerate(group):
            if _check_bootstrap(config, maddr, fail="FAIL" if i == len(group) - 1 else "warn") == 0:
                break
        else:  # no address of this bootstrap answered
            failures += 1
    if kinds <= {"loopback"}:
        _say("warn", "only loopback addresses are visible: other machines cannot reach this host (use --host 0.0.0.0)")
    elif "public" not in kinds and not config.announce:
        _say("warn", "no public address is visible: peers outside this network need --announce or --client-mode")
    _say("ok" if not failures else "FAIL", "all checks passed" if not failures else f"{failures} check(s) failed")
    return 0 if not failures else 1
