"""One atomic-write helper for checkpoints, status files and address files: readers see the old or the new file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh import atomicfile


@pytest.mark.parametrize("durable", [False, True])
def test_write_replaces_whole_and_leaves_no_temp(tmp_path: Path, durable: bool) -> None:
    target = tmp_path / "api.url"
    target.write_text("old\n")
    atomicfile.write(target, "http://127.0.0.1:1234\n", durable=durable)
    assert target.read_text() == "http://127.0.0.1:1234\n"
    atomicfile.write(target, b"\x00\x01")
    atomicfile.write(target, lambda handle: handle.write(b"from a writer"))
    assert target.read_bytes() == b"from a writer"
    assert [p.name for p in tmp_path.iterdir()] == ["api.url"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    target.write_text('{"epoch": 1}')

    def crash(handle) -> None:
        handle.write(b'{"epo')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomicfile.write(target, crash)
    assert target.read_text() == '{"epoch": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_permissions_are_readable_by_others_unless_asked(tmp_path: Path) -> None:
    status, secret = tmp_path / "status.json", tmp_path / "checkpoint.pt"
    atomicfile.write(status, "{}")
    atomicfile.write(secret, b"state", durable=True, mode=0o600)
    assert status.stat().st_mode & 0o777 == 0o644 and secret.stat().st_mode & 0o777 == 0o600
