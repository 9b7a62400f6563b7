"""Podman for the container tests: the CLI with this machine's settings, a base image made on the machine, builds.

No Docker engine runs here and no image can be pulled, so the base image (the stand-in for ``python:3.11-slim``) is
made with debootstrap from the Debian mirror apt already uses, and kept between runs like a pulled base image would
be. pip inside the build reaches the registry through this machine's pip settings (CA bundle, local wheel
directory), which are mounted into the build and passed as the Dockerfile's ``PIP_*`` build arguments.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.procs import REPO

PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
BASE_IMAGE = "localhost/mesh-test-base:bookworm"
# Test-only images (Dockerfile.NAME) for what docker/compose.yaml pulls and this machine cannot: never shipped.
TEST_IMAGES = REPO / "tests" / "containers" / "images"
_CONF_DIR = Path(tempfile.gettempdir()) / "mesh-test-containers"


# lifecycle.kill_descendants: up to 3 s for SIGTERM, then 3 s after SIGKILL.
REAP_SECONDS = 6.0


def peer_stop_bound(matchmaking_time: float, averaging_timeout: float, shutdown_timeout: float) -> float:
    """The longest a peer may take to exit after SIGTERM: the stop flag is read between steps, and one step can be
    caught in gradient averaging and then parameter averaging (each up to matchmaking + averaging timeout); then
    the leave with its final checkpoint (bounded by the shutdown timeout) and reaping its daemons."""
    return 2 * (matchmaking_time + averaging_timeout) + shutdown_timeout + REAP_SECONDS


@functools.cache
def podman_env() -> dict[str, str]:
    """This machine's kernel refuses podman's default ulimits inside its sandbox; a containers.conf drops them. It also
    names the runtime and cgroup manager of ``PODMAN``, for the podman that podman-compose runs."""
    _CONF_DIR.mkdir(exist_ok=True)
    conf = _CONF_DIR / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n')
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args: str, timeout: float = 120, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([*PODMAN, *args], capture_output=True, timeout=timeout, env=podman_env(), input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr.decode(errors='replace')[-3000:]}")
    return result


def out(*args: str, timeout: float = 120) -> str:
    return podman(*args, timeout=timeout).stdout.decode().strip()


def image_ids() -> set[str]:
    return set(out("images", "--all", "--quiet", "--no-trunc").split())


def debian_mirror() -> str:
    """The Debian mirror apt is configured with (deb822 .sources or the one-line sources.list)."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and "bookworm" in suites.group(1).split():
                return uris.group(1)
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        match = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", sources.read_text(), re.M)
        if match:
            return match.group(1)
    raise AssertionError("no Debian bookworm mirror in apt's sources; debootstrap needs one for the base image")


def ensure_base_image() -> str:
    """A bookworm minbase with python3 + venv + CA certificates, imported as an image (about a minute, once)."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    root = Path(tempfile.mkdtemp(prefix="mesh-rootfs-"))
    try:
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm", str(root), debian_mirror()],
            check=True,
            capture_output=True,
            timeout=900,
        )
        tar = subprocess.run(["tar", "-C", str(root), "-c", "."], check=True, capture_output=True, timeout=300)
        message = "mesh test base: debootstrap bookworm minbase + python3"
        podman("import", "--message", message, "-", BASE_IMAGE, input=tar.stdout, timeout=300)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return BASE_IMAGE


def _pip_config() -> dict[str, str]:
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    config = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        config[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    return config


def pip_build_options() -> list[str]:
    """``--build-arg``/``--volume`` options that give pip in the build the same CA bundle and local wheels as here."""
    config = _pip_config()
    options: list[str] = []
    cert = os.environ.get("PIP_CERT") or config.get("cert")
    if cert and Path(cert).is_file():
        options += ["--volume", f"{cert}:/run/mesh-build/ca.pem:ro", "--build-arg", "PIP_CERT=/run/mesh-build/ca.pem"]
    links = [p for p in (os.environ.get("PIP_FIND_LINKS") or config.get("find-links", "")).split() if Path(p).is_dir()]
    for i, path in enumerate(links):
        options += ["--volume", f"{path}:/run/mesh-build/links{i}:ro"]
    if links:
        options += ["--build-arg", "PIP_FIND_LINKS=" + " ".join(f"/run/mesh-build/links{i}" for i in range(len(links)))]
    return options


def _build(dockerfile: Path, context: Path, tag: str, *options: str) -> None:
    podman(
        "build",
        "--layers=false",
        "--format",
        "docker",
        "--network",
        "host",
        "--file",
        str(dockerfile),
        *options,
        "--tag",
        tag,
        "--build-arg",
        f"BASE_IMAGE={ensure_base_image()}",
        *pip_build_options(),
        str(context),
        timeout=1200,
    )


def build(target: str, tag: str) -> None:
    """One target of docker/Dockerfile, the shipped images."""
    _build(REPO / "docker" / "Dockerfile", REPO, tag, "--target", target)


def build_test_image(name: str, tag: str) -> None:
    """``tests/containers/images/Dockerfile.NAME`` on the base image: a stand-in for an image that cannot be pulled."""
    _build(TEST_IMAGES / f"Dockerfile.{name}", TEST_IMAGES, tag)


def inspect(name: str) -> dict:
    return json.loads(out("inspect", name))[0]
