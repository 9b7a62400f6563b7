"""Bootstrap health URLs as join addresses: ``--join http://bootstrap:9100/healthz`` reads the bootstrap's multiaddrs
from its ``/healthz`` (its ``--metrics-port``). Compose and Kubernetes name the bootstrap by service name before its
peer id exists, so this is how their peers join. Standard library only: the coordinator (no hivemind) uses it too.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request

from mesh.errors import JoinError

logger = logging.getLogger(__name__)


def is_url(entry: str) -> bool:
    return entry.startswith(("http://", "https://"))


def fetch_addrs(url: str, timeout: float) -> list[str]:
    """The ``addrs`` a bootstrap's health URL lists, retried until ``timeout`` while the bootstrap starts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=min(5.0, max(timeout, 2.0))) as response:
                addrs = json.loads(response.read())["addrs"]
            if not isinstance(addrs, list) or not addrs or not all(isinstance(a, str) for a in addrs):
                raise ValueError("no list of addrs in the reply")
            return addrs
        except (OSError, ValueError, KeyError, TypeError) as err:
            if time.monotonic() >= deadline:
                raise JoinError(
                    f"could not read the bootstrap's addresses from {url} within {timeout:g}s ({err}); "
                    "is it the bootstrap's /healthz URL (its --metrics-port), and is the bootstrap running?"
                ) from None
            time.sleep(1.0)


def resolve(entries: tuple[str, ...], timeout: float) -> list[str]:
    """Multiaddrs to join through: plain entries as they are, URLs replaced by the addresses they list. One URL
    that does not answer is skipped while other entries give addresses; when none does, its error is raised."""
    addrs: list[str] = []
    errors: list[JoinError] = []
    for entry in entries:
        if not is_url(entry):
            addrs.append(entry)
            continue
        try:
            fetched = fetch_addrs(entry, timeout)
        except JoinError as err:
            errors.append(err)
            continue
        logger.info("join addresses url=%s addrs=%s", entry, ",".join(fetched))
        addrs.extend(fetched)
    if errors and not addrs:
        raise errors[0]
    for error in errors:
        logger.warning("%s; joining through the other addresses", error)
    return addrs
