"""Images for the container tests, built once per test session and shared by test_images.py and test_compose.py.

Everything built here is removed at the end of the session (and checked), except the debootstrap base image, which is
kept like a pulled base. ``MESH_TEST_KEEP_IMAGES=1`` keeps them and reuses them on the next run (a development aid).
"""

from __future__ import annotations

import os
import time

import pytest

from tests.containers import podman as pm


def _keep() -> bool:
    return os.environ.get("MESH_TEST_KEEP_IMAGES") == "1"


def _build_all(built: dict[str, str], build) -> dict[str, float]:
    seconds = {}
    for what, name in built.items():
        if _keep() and pm.podman("image", "exists", name, check=False).returncode == 0:
            continue
        started = time.monotonic()
        build(what, name)
        seconds[what] = round(time.monotonic() - started, 1)
    return seconds


def _remove(built: dict[str, str], before: set[str], what: str) -> None:
    if _keep():
        return
    for name in built.values():
        pm.podman("rmi", "--force", name, check=False)
    for image in pm.image_ids() - before:  # the build stages' untagged images
        pm.podman("rmi", "--force", image, check=False)
    assert pm.image_ids() <= before, f"images built for {what} were left behind"


@pytest.fixture(scope="session")
def images():
    """Both targets of docker/Dockerfile (the shipped images); removed with their build stages afterwards."""
    built = {"mesh": "localhost/mesh-test:latest", "coordinator": "localhost/mesh-coordinator-test:latest"}
    pm.ensure_base_image()
    before = pm.image_ids()
    try:
        print(f"\nbuild seconds: {_build_all(built, pm.build)}")
        yield built
    finally:
        _remove(built, before, "the mesh")


@pytest.fixture(scope="session")
def stand_in_images():
    """Test-only images for what docker/compose.yaml pulls and no registry serves here (tests/containers/images/):
    Prometheus from Debian's package, SecantusDB for MongoDB. Never shipped; removed afterwards."""
    built = {"prometheus": "localhost/mesh-test-prometheus:latest", "secantus": "localhost/mesh-test-secantus:latest"}
    pm.ensure_base_image()
    before = pm.image_ids()
    try:
        print(f"\nstand-in image build seconds: {_build_all(built, pm.build_test_image)}")
        yield built
    finally:
        _remove(built, before, "the compose test")
