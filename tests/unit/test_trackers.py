"""mesh/trackers.py: the CSV tracker's file against the rows given, and a tracker that fails is dropped, not fatal."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from mesh.trackers import FIELDS, Trackers, open_trackers

ROW = {"epoch": 1, "loss": 0.5, "eval_loss": float("nan"), "lr": 0.1, "samples_per_second": 10.0, "group": 2}
ROW |= {"rounds_ok": 1, "rounds_failed": 0}


def test_csv_rows_append_across_restarts_with_one_header(tmp_path: Path) -> None:
    for epoch in (1, 2):
        trackers = Trackers(open_trackers(("csv", "csv"), tmp_path, "run", "peer"))  # a name given twice: one tracker
        trackers.log({**ROW, "epoch": epoch})
        trackers.close()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and list(rows[0]) == list(FIELDS)
    assert rows[0]["eval_loss"] == "" and rows[0]["loss"] == "0.5"  # unknown values are empty cells


class Broken:
    closed = False

    def log(self, row) -> None:
        raise OSError("No space left on device")

    def close(self) -> None:
        Broken.closed = True


def test_a_tracker_that_fails_is_closed_and_dropped_with_a_warning(tmp_path: Path, caplog) -> None:
    good = open_trackers(("csv",), tmp_path, "run", "peer")
    trackers = Trackers([Broken(), *good])
    with caplog.at_level(logging.WARNING):
        trackers.log(ROW)
        trackers.log({**ROW, "epoch": 2})
    assert Broken.closed and sum("tracker Broken failed" in r.message for r in caplog.records) == 1
    trackers.close()
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3  # the others kept writing
