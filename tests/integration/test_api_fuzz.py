"""Schemathesis against a live coordinator on 127.0.0.1, from the coordinator's own OpenAPI document: no 5xx,
every response matches the document (status code, content type, headers, body schema), invalid requests are
rejected, and the stateful phase (create, read, stop...) holds.

Excluded: ``positive_data_acceptance``, because one rule cannot be written in JSON Schema: ``min_peers <=
max_peers``. Such a body is rejected with 422, which that check would count as a failure.

Runs the ``schemathesis`` CLI: its pytest plugin does not support pytest 9 yet.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import reap, spawn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]  # real processes: minutes, not the default 60 s


def test_api_conforms_to_its_own_openapi_document(tmp_path: Path) -> None:
    url_file = tmp_path / "api.url"
    process = spawn(
        "coordinator",
        ["api", "--host", "127.0.0.1", "--port", "0", "--db-path", str(tmp_path / "c.db"), "--address-file", str(url_file)],
        tmp_path,
    )
    try:
        process.wait_for(url_file.exists, 60, "its address")
        url = url_file.read_text().strip()
        st = Path(sys.executable).parent / "schemathesis"
        result = subprocess.run(
            [
                str(st),
                "run",
                f"{url}/api/v1/openapi.json",
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                "--max-examples",
                "20",
                "--seed",
                "1",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=280,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        assert "15 passed" in result.stdout  # every operation of the document was exercised
        assert process.proc.poll() is None, "the coordinator died under the fuzzer"
        # our handlers never failed (aiohttp itself logs the fuzzer's NUL-byte header probes, answered with 400)
        assert "unhandled error" not in process.output(), process.output()[-3000:]
    finally:
        reap(process)
