"""The benchmark itself, at a tiny scale: it runs, and the job stays light on production."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.cluster import Cluster
from bench import run
from tests import pgbin


@pytest.mark.one_major
@pytest.mark.slow
@pytest.mark.throwaway_clusters
@pytest.mark.skipif(
    bool(os.environ.get("TEST_DATABASE_URL")),
    reason="starts a cluster of its own; not with TEST_DATABASE_URL",
)
def test_benchmark_runs_and_reports_the_job_against_pg_dump(tmp_path: Path) -> None:
    out = tmp_path / "results"
    assert (
        run.main(
            [
                "--scale",
                "0.005",
                "--rounds",
                "1",
                "--workdir",
                str(tmp_path / "w"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.with_suffix(".json").read_text())
    (scale,) = report["scales"]
    medians = scale["medians"]
    # The job in its three modes, beside the raw dump at both compressions.
    assert set(medians) == {"A", "B", "B_scratchdb", "B_embedded", "A_zstd1"}
    job = medians["B"]
    assert scale["source"]["tables"]["events"]["rows"] == 15000
    # Peaks of the process's own memory: not the RSS of the pytest process that forked it.
    assert 10 * 2**20 < job["job_rss_bytes"] < 100 * 2**20
    assert 0 < job["pg_dump_rss_bytes"] < job["job_rss_bytes"]
    assert 0 < medians["A"]["rss_bytes"] < 100 * 2**20
    # UNLOGGED scratch tables: the copy writes a small fraction of its size into the WAL.
    assert job["wal_bytes"] < scale["source"]["table_bytes"] / 2
    assert {"copy", "pg_dump", "drop_publish"} <= set(job["stages"])
    for mode in ("B_scratchdb", "B_embedded"):
        assert {"setup", "prepare", "copy", "indexes", "pg_dump"} <= set(medians[mode]["stages"])
        assert medians[mode]["job_rss_bytes"] < 100 * 2**20
    # The embedded server is not the source's cluster: the source writes next to nothing.
    assert medians["B_embedded"]["wal_bytes"] < scale["source"]["table_bytes"] / 20
    assert set(scale["paired_ratios"]) == {
        f"{job}/{dump}" for job in ("B", "B_scratchdb", "B_embedded") for dump in ("A", "A_zstd1")
    }
    table = out.with_suffix(".md").read_text()
    assert "| 0.005 |" in table and report["server"]["server_version"] in table
    port = json.loads((tmp_path / "w" / "cluster.json").read_text())["port"]
    assert not Cluster(pgbin.bindir(run.MAJOR), tmp_path / "w" / "pg", port).is_running()
