"""Bytes this process really sent and received over TCP: the kernel's own counters of each of its sockets.

hivemind counts no bytes, and the data plane's collectives run inside gloo, which does not either; but the kernel
keeps, per TCP socket, the payload bytes sent (``tcpi_bytes_sent``, retransmissions included) and received
(``tcpi_bytes_received``), readable with ``getsockopt(TCP_INFO)`` (Linux 4.19 and later). :class:`TcpTraffic`
sums them over the process's sockets, each socket counted from where it was at the last reading, so the totals
only grow. A socket that closes between two readings loses what it moved since the last one; the data plane's
sockets live as long as its cached process group, so reading once per epoch loses little.

In a peer's training process these sockets are the data plane (gloo), its rendezvous store and the HTTP of
metrics scrapes and coordinator heartbeats; hivemind's DHT, matchmaking and its own all-reduce go through its
libp2p daemon, another process, and are not in them.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

_BYTES_RECEIVED = 128  # offsets in struct tcp_info (include/uapi/linux/tcp.h)
_BYTES_SENT = 200
_INFO_SIZE = 256


def _socket_counters() -> dict[int, tuple[int, int]]:
    """(sent, received) by socket inode for every TCP socket this process holds."""
    counters = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if not target.startswith("socket:["):
            continue
        try:
            sock = socket.fromfd(int(fd), socket.AF_INET, socket.SOCK_STREAM)  # a duplicate: closing it is safe
        except OSError:
            continue
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _INFO_SIZE)
        except OSError:
            continue  # not TCP (a pipe to hivemind's processes, a unix socket)
        finally:
            sock.close()
        if len(info) >= _BYTES_SENT + 8:
            counters[int(target[8:-1])] = (struct.unpack_from("Q", info, _BYTES_SENT)[0], struct.unpack_from("Q", info, _BYTES_RECEIVED)[0])
    return counters


class TcpTraffic:
    """Running totals of the bytes this process sent and received over TCP (see the module's docstring)."""

    def __init__(self) -> None:
        self.sent = self.received = 0
        self._last: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def update(self) -> tuple[int, int]:
        """Read every socket's counters now; returns the totals (sent, received)."""
        with self._lock:
            now = _socket_counters()
            for inode, (sent, received) in now.items():
                last_sent, last_received = self._last.get(inode, (0, 0))
                self.sent += max(0, sent - last_sent)
                self.received += max(0, received - last_received)
            self._last = now
            return self.sent, self.received
