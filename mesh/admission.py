"""Run admission: what a run's secret derives, and the one place refusals are checked, counted and logged.

A run created with ``--run-secret`` is *protected*. Every admitted peer holds the secret; from it and the run id
each derives, alike and offline (HMAC-SHA256, no exchange):

- the run's **key** ``K = HMAC(secret, "mesh run v1" || run id)``: one secret used for two runs gives two keys;
- the run's **namespace**: the name hivemind's progress tracker, averagers and their RPCs live under
  (``RUN_<32 hex digits of HMAC(K, "namespace")>`` instead of ``RUN``; hivemind forbids "." in these names,
  so a run id's dots become "+", a character run ids cannot have). An outsider cannot address what it
  cannot name: every DHT key of the run's training is a hash of this name, and every averaging RPC's handler is
  registered under it;
- each peer's **ticket** ``HMAC(K, "ticket" || peer id)``: sent in the metadata of every matchmaking request and
  checked against the peer id the libp2p transport authenticated, so a ticket seen elsewhere cannot be used
  under another id;
- **signatures** of the run's DHT records (run record, presence) and of the state a peer serves to a joiner.

A run without a secret is *open*: every check passes, names are the run id as before.

Refusals are counted per reason in shared memory, so that the averagers' processes (forked from the training
process after the :class:`Admission` is made) count into the same numbers the trainer brings into
``mesh_peer_refused_total{reason}`` every epoch. Standard library only.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import hmac
import json
import logging
import multiprocessing as mp
import secrets
import time
from typing import Any

logger = logging.getLogger(__name__)

# why a peer was refused: what it tried, and on which path
REFUSAL_REASONS = (
    "unadmitted",  # an averaging RPC at the run's public name: a process without the secret
    "ticket",  # a matchmaking request under the run's namespace without a valid ticket for its peer id
    "group",  # a formed group (hivemind's leader told the members) with a member without a valid ticket
    "download",  # a state download asked by a peer that has no signed presence in the run
    "state",  # downloaded state whose signature does not verify
    "record",  # a run record under a protected run's id that is unsigned or whose signature does not verify
    "presence",  # a peer presence under a protected run whose signature does not verify
    "rendezvous",  # a forged value in a data-plane store, or a data-plane connection that does not prove the key
)
LOG_EVERY = 60.0  # seconds between WARNING lines for the same reason and peer
REMEMBERED = 4096  # (reason, peer) and (reason, record) pairs kept for the limits below; older ones are forgotten


def generate_secret() -> str:
    """A new run secret: 32 random bytes, URL-safe text."""
    return secrets.token_urlsafe(32)


def coordinator_secret(key: str, run_id: str) -> str:
    """The secret a coordinator with ``--run-secret-key`` hands out for ``run_id``: derived, so nothing is stored."""
    digest = hmac.new(key.encode(), b"mesh coordinator run secret v1\0" + run_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def canonical(payload: Any) -> bytes:
    """The bytes a signature covers: JSON with sorted keys (floats print exactly as they round-trip)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


class Admission:
    """A run's admission rules on this peer: open (no secret) or protected."""

    def __init__(self, run_id: str, secret: str | None = None) -> None:
        self.run_id = run_id
        self._key = hmac.new(secret.encode(), b"mesh run v1\0" + run_id.encode(), hashlib.sha256).digest() if secret else None
        # shared with the processes forked from this one after it was made (hivemind's averagers)
        self._refused = mp.RawArray(ctypes.c_long, len(REFUSAL_REASONS))
        self._logged: dict[tuple[str, str], float] = {}
        self._seen: set[tuple[str, str]] = set()  # (reason, what) counted once: a record read again is one refusal

    @property
    def protected(self) -> bool:
        return self._key is not None

    def _mac(self, purpose: bytes, *parts: bytes) -> bytes:
        assert self._key is not None
        mac = hmac.new(self._key, purpose + b"\0", hashlib.sha256)
        for part in parts:  # length-prefixed: no two lists of parts give the same bytes
            mac.update(len(part).to_bytes(8, "big") + part)
        return mac.digest()

    @property
    def public_namespace(self) -> str:
        """The name an open run of this id has in hivemind (which forbids "." in it)."""
        return self.run_id.replace(".", "+")

    @property
    def namespace(self) -> str:
        """The name of the run's training in hivemind (progress key, averager prefixes, RPC handlers)."""
        if self._key is None:
            return self.public_namespace
        return f"{self.public_namespace}_{self._mac(b'namespace')[:16].hex()}"

    def public_name(self, name: str) -> str:
        """``name`` (built on the namespace) as an open run of the same id would call it."""
        return self.public_namespace + name[len(self.namespace) :] if name.startswith(self.namespace) else name

    def ticket(self, peer_id: bytes) -> str | None:
        return self._mac(b"ticket", peer_id).hex() if self._key is not None else None

    def admits(self, peer_id: bytes, ticket: Any) -> bool:
        """Whether ``ticket`` is this run's for ``peer_id`` (always, in an open run)."""
        if self._key is None:
            return True
        return isinstance(ticket, str) and hmac.compare_digest(ticket, self._mac(b"ticket", peer_id).hex())

    def sign(self, kind: str, payload: Any) -> str | None:
        """A signature of ``payload`` (JSON-able) as a ``kind`` of record; None in an open run."""
        return self._mac(kind.encode(), canonical(payload)).hex() if self._key is not None else None

    def verify(self, kind: str, payload: Any, signature: Any) -> bool:
        if self._key is None:
            return True
        return isinstance(signature, str) and hmac.compare_digest(signature, self._mac(kind.encode(), canonical(payload)).hex())

    def subkey(self, purpose: str) -> bytes | None:
        """A key for one ``purpose`` (the data plane's store, its connections), derived from the run's; None when open."""
        return self._mac(b"subkey", purpose.encode()) if self._key is not None else None

    def mac(self, kind: str, *parts: bytes) -> str | None:
        """A signature over raw parts (a state's tensors); None in an open run."""
        return self._mac(kind.encode(), *parts).hex() if self._key is not None else None

    # ---- refusals ----

    def refuse(self, reason: str, peer: Any = "", detail: str = "", once: str | None = None) -> None:
        """Count and log one refusal. ``once``: count it only the first time (the same forged record read again)."""
        if once is not None:
            if (reason, once) in self._seen:
                return
            if len(self._seen) >= REMEMBERED:  # an attacker cycling subkeys cannot grow this without bound
                self._seen.clear()
            self._seen.add((reason, once))
        self._refused[REFUSAL_REASONS.index(reason)] += 1
        peer = str(peer)
        now = time.monotonic()
        if now - self._logged.get((reason, peer), -LOG_EVERY) >= LOG_EVERY:
            if len(self._logged) >= REMEMBERED:  # nor cycling peer ids this
                self._logged.clear()
            self._logged[(reason, peer)] = now
            logger.warning("refused reason=%s run=%s peer=%s%s", reason, self.run_id, peer or "-", f" {detail}" if detail else "")

    def refusals(self) -> dict[str, int]:
        """Refusals so far by reason, counted in this process and in those forked from it."""
        return dict(zip(REFUSAL_REASONS, self._refused))
