"""Joining the DHT: multiaddr validation, port checks, start with a join timeout, visible addresses."""

from __future__ import annotations

import errno
import logging
import socket
import time

from hivemind import DHT
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

from mesh import asyncio_guard, join_url, logs
from mesh.config import NetworkConfig
from mesh.errors import JoinError
from mesh.records import RUN_RECORD_VALIDATOR, signature_validator

logger = logging.getLogger(__name__)
asyncio_guard.install()

MULTIADDR_HELP = "expected /ip4/HOST/tcp/PORT/p2p/PEERID (or /dns4/NAME/... or /ip6/...), as printed by `mesh bootstrap`"
_HOST_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")


def parse_multiaddr(text: str) -> Multiaddr:
    """A full, joinable multiaddr: a host, a TCP port and the peer id. Raises JoinError with one line otherwise."""
    text = text.strip()
    try:
        maddr = Multiaddr(text)
        protocols = [p.name for p in maddr.protocols()]
    except Exception as err:  # the multiaddr library raises several unrelated types
        raise JoinError(f"invalid multiaddr {text!r}: {err}; {MULTIADDR_HELP}") from None
    if not protocols or protocols[0] not in _HOST_PROTOCOLS:
        raise JoinError(f"invalid multiaddr {text!r}: it must start with a host; {MULTIADDR_HELP}")
    if "tcp" not in protocols:
        raise JoinError(f"invalid multiaddr {text!r}: no /tcp/PORT; {MULTIADDR_HELP}")
    if "p2p" not in protocols:
        raise JoinError(f"invalid multiaddr {text!r}: no /p2p/PEERID part; {MULTIADDR_HELP}")
    port = int(maddr.value_for_protocol("tcp"))
    if not 0 < port < 65536:
        raise JoinError(f"invalid multiaddr {text!r}: port {port} out of range; {MULTIADDR_HELP}")
    try:
        PeerID.from_base58(maddr.value_for_protocol("p2p"))
    except Exception:
        raise JoinError(f"invalid multiaddr {text!r}: the peer id is not valid base58; {MULTIADDR_HELP}") from None
    return maddr


def host_maddrs(host: str, port: int) -> list[str]:
    family = "ip6" if ":" in host else "ip4"
    return [f"/{family}/{host}/tcp/{port}"]


def check_port_free(host: str, port: int) -> None:
    """Fail early, with one line, when a fixed port is taken (p2pd's own error is a Go stack of text)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise JoinError(f"port {port} on {host} is already in use; pick another with --port (0 = any free port)") from None
            raise JoinError(f"cannot listen on {host}:{port}: {err.strerror}") from None


DHT_RPC_TIMEOUT = 3.0  # seconds a DHT request to one node may take (hivemind's default)


def start_dht(config: NetworkConfig, *, require_join: bool | None = None) -> DHT:
    """Start this process's DHT node and join the mesh through ``config.join``.

    Raises JoinError when an address is malformed, the port is taken, or nobody answers within ``join_timeout``.
    """
    logs.route_hivemind()
    initial_peers = [str(parse_multiaddr(addr)) for addr in join_url.resolve(config.join, config.join_timeout)]
    for addr in config.announce:
        try:
            announced = Multiaddr(addr)
        except Exception as err:
            raise JoinError(f"invalid --announce multiaddr {addr!r}: {err}; expected e.g. /ip4/PUBLIC_IP/tcp/PORT") from None
        if "tcp" in [p.name for p in announced.protocols()] and announced.value_for_protocol("tcp") == "0":
            raise JoinError(f"--announce {addr} needs an explicit port, not 0")
    if not config.client_mode:
        check_port_free(config.host, config.port)
    require_join = bool(initial_peers) if require_join is None else require_join
    logger.info(
        "starting dht host=%s port=%d join=%s client_mode=%s",
        config.host,
        config.port,
        ",".join(initial_peers) or "-",
        config.client_mode,
    )
    try:
        dht = DHT(
            initial_peers=initial_peers,
            start=True,
            host_maddrs=host_maddrs(config.host, config.port),
            announce_maddrs=list(config.announce) or None,
            identity_path=str(config.identity) if config.identity else None,
            client_mode=config.client_mode,
            # owned subkeys (a protected run's records, hivemind's progress reports) only their owner can write
            record_validators=[RUN_RECORD_VALIDATOR, signature_validator()],
            # per Kademlia RPC, not the join's budget (that is bootstrap/startup_timeout): hivemind's progress
            # tracker holds its lock through a DHT lookup, so one frozen peer (SIGSTOP, a stalled host) used to
            # stall every other peer's epoch for the whole --join-timeout at each lookup that asked it
            wait_timeout=min(DHT_RPC_TIMEOUT, config.join_timeout),
            bootstrap_timeout=min(5.0, config.join_timeout),
            ensure_bootstrap_success=require_join,
            startup_timeout=config.join_timeout,
            shutdown_timeout=2.0,
        )
    except Exception as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "none of the initial_peers responded" in message or "bootstrap" in message.lower():
            raise JoinError(
                f"nobody answered at {', '.join(initial_peers)} within {config.join_timeout:g}s; "
                "check that the bootstrap is running and its port is reachable (try `mesh doctor --join ADDR`)"
            ) from None
        if "can't access this node" in message:
            raise JoinError(
                "the mesh answered but cannot connect back to this host (NAT or firewall): forward the port and pass "
                "--announce /ip4/PUBLIC_IP/tcp/PORT, or join with --client-mode"
            ) from None
        if "already taken" in message:
            raise JoinError(f"identity {config.identity} is already used by a live peer; give each process its own --identity") from None
        raise JoinError(f"could not start the DHT node: {message}") from None
    return dht


def visible_maddrs(dht: DHT) -> list[str]:
    """Addresses others can join through, loopback last so the first one is the most useful."""
    addrs = [str(a) for a in dht.get_visible_maddrs(latest=True)]
    return sorted(addrs, key=lambda a: ("/127.0.0.1/" in a or "/::1/" in a, a))


async def _routing_table_size(_dht, node) -> int:
    # a lookup of a random key contacts peers and drops the dead ones from the routing table
    await node.get(f"mesh_heartbeat_{time.monotonic_ns()}", latest=True)
    return len(node.protocol.routing_table.uid_to_peer_id)


def routing_table_size(dht: DHT, timeout: float = 30.0) -> int:
    """DHT peers this node knows (its routing table), after refreshing it."""
    return dht.run_coroutine(_routing_table_size, return_future=True).result(timeout)


def data_plane_host(configured: str | None, host: str, announce: tuple[str, ...], dht: DHT) -> str:
    """The address other members reach this peer's data plane at: the one asked for, else the listening host, else
    the first IPv4 address this peer announces, else the first it is visible at (non-loopback first)."""
    if configured:
        return configured
    if host not in ("0.0.0.0", "::", ""):
        return host
    candidates = [part.split("/")[2] for part in announce if part.startswith("/ip4/")]
    visible = [addr.split("/")[2] for addr in visible_maddrs(dht) if addr.startswith("/ip4/")]
    candidates += [ip for ip in visible if not ip.startswith("127.")] + [ip for ip in visible if ip.startswith("127.")]
    return next((ip for ip in candidates if ip != "0.0.0.0"), "127.0.0.1")
