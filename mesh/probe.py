"""Container health probe: ``python -m mesh.probe metrics|api`` exits 0 when this container's process answers.

The HEALTHCHECK of the images runs it; the port comes from the same ``MESH_*`` variables the process read, so a
container started with another port is probed on that port. Standard library only: it must start fast.
"""

from __future__ import annotations

import os
import sys
import urllib.request

TARGETS = {
    # kind: (port variable, default port, path)
    "metrics": ("MESH_METRICS_PORT", "9100", "/healthz"),
    "api": ("MESH_PORT", "8080", "/api/v1/health"),
}


def url_for(kind: str, env: dict[str, str]) -> str:
    variable, default, path = TARGETS[kind]
    return f"http://127.0.0.1:{env.get(variable) or default}{path}"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in TARGETS:
        print(f"usage: python -m mesh.probe {{{'|'.join(TARGETS)}}}", file=sys.stderr)
        return 2
    url = url_for(argv[0], dict(os.environ))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP(S)_PROXY
    try:
        with opener.open(url, timeout=4):  # any status but 2xx raises
            pass
    except OSError as err:
        print(f"unhealthy: {url}: {err}", file=sys.stderr)
        return 1
    print(f"healthy: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
