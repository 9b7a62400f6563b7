"""Images for the container tests, built once per test session and shared by test_images.py and test_compose.py.

Everything built here is removed at the end of the session (and checked), except the debootstrap base image, which is
kept like a pulled base. ``MESH_TEST_KEEP_IMAGES=1`` keeps them and reuses them on the next run (a development aid).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.containers import podman as pm


def _keep() -> bool:
    return os.environ.get("MESH_TEST_KEEP_IMAGES") == "1"


def _build_all(built: dict[str, str], builders: dict[str, object]) -> dict[str, float]:
    """Build every image at once (podman builds in parallel; most of a build waits on pip, apt and the disk, so
    on 2 cores four at once take well under the sum of their times); the seconds each took."""
    seconds: dict[str, float] = {}

    def one(what: str) -> None:
        name = built[what]
        if _keep() and pm.podman("image", "exists", name, check=False).returncode == 0:
            return
        started = time.monotonic()
        builders[what](what, name)
        seconds[what] = round(time.monotonic() - started, 1)

    with ThreadPoolExecutor(len(built)) as pool:
        for future in [pool.submit(one, what) for what in built]:
            future.result()
    return seconds


def _remove(built: dict[str, str], before: set[str], what: str) -> None:
    if _keep():
        return
    for name in built.values():
        pm.podman("rmi", "--force", name, check=False)
    for image in pm.image_ids() - before:  # the build stages' untagged images
        pm.podman("rmi", "--force", image, check=False)
    assert pm.image_ids() <= before, f"images built for {what} were left behind"


SHIPPED = {"mesh": "localhost/mesh-test:latest", "coordinator": "localhost/mesh-coordinator-test:latest"}
# test-only images for what docker/compose.yaml pulls and no registry serves here (tests/containers/images/):
# Prometheus from Debian's package, SecantusDB for MongoDB; never shipped
STAND_INS = {"prometheus": "localhost/mesh-test-prometheus:latest", "secantus": "localhost/mesh-test-secantus:latest"}


@pytest.fixture(scope="session")
def _all_images():
    """Both targets of docker/Dockerfile (the shipped images) and the stand-ins, built together once per session;
    removed with their build stages afterwards."""
    built = {**SHIPPED, **STAND_INS}
    builders = {**{what: pm.build for what in SHIPPED}, **{what: pm.build_test_image for what in STAND_INS}}
    pm.ensure_base_image()
    before = pm.image_ids()
    try:
        print(f"\nbuild seconds (in parallel): {_build_all(built, builders)}")
        yield built
    finally:
        _remove(built, before, "the container tests")


@pytest.fixture(scope="session")
def images(_all_images):
    """The shipped images: both targets of docker/Dockerfile."""
    return {what: _all_images[what] for what in SHIPPED}


@pytest.fixture(scope="session")
def stand_in_images(_all_images):
    """The stand-ins for the images docker/compose.yaml pulls (tests/containers/images/)."""
    return {what: _all_images[what] for what in STAND_INS}
