"""How often `scan` flags the job-server fixture's kept columns when it should not.

The kept columns of `allow_list.json` hold no personal data; three hold random secrets
(`django_session.session_key`, `social_auth_code.code`, `social_auth_nonce.salt`), which
the scan must flag: every other flag is a false positive.

    python -m tests.seed.jobserver.scan_rate [ROWS]

starts a throwaway PostgreSQL 17, loads the fixture with ROWS rows a table (default 200),
scans it and prints the rates.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests import jobrun
from tests.seed.jobserver import data

HERE = Path(__file__).resolve().parent
REVIEWED = HERE / "allow_list.reviewed.json"
TRUE_POSITIVES = {
    ("django_session", "session_key"),
    ("social_auth_code", "code"),
    ("social_auth_nonce", "salt"),
}


@dataclass
class Rate:
    columns: int  # kept columns scanned
    values: int  # non-NULL values read
    flagged: set[tuple[str, str]]
    false_positive_values: int

    @property
    def false_positive_columns(self) -> int:
        return len(self.flagged - TRUE_POSITIVES)

    def describe(self) -> str:
        return (
            f"scan of the job-server fixture's kept columns: {self.columns} columns, "
            f"{self.values} values; flagged {len(self.flagged)} columns, "
            f"{len(self.flagged & TRUE_POSITIVES)} of them random secrets as expected; "
            f"false positives: {self.false_positive_columns} of {self.columns} columns "
            f"({self.false_positive_columns / self.columns:.1%}), "
            f"{self.false_positive_values} of {self.values} values "
            f"({self.false_positive_values / self.values:.2%})"
        )


def measure(url: str, bindir: Path, rows: int = 1000) -> Rate:
    with tempfile.TemporaryDirectory() as storage:
        env = jobrun.job_env(url, Path(storage), bindir, ALLOW_LIST=str(data.ALLOW_LIST))
        result = jobrun.run(env, "scan", "--format", "json", "--rows", str(rows))
    if result.returncode not in (0, 3):
        raise RuntimeError(result.stderr)
    report = json.loads(result.stdout)
    flagged = {(f["table"].split(".", 1)[1], f["column"]) for f in report["findings"]}
    false_values = sum(
        f["count"]
        for f in report["findings"]
        if (f["table"].split(".", 1)[1], f["column"]) not in TRUE_POSITIVES
    )
    return Rate(report["columns"], report["values"], flagged, false_values)


def main(rows: int) -> None:
    from app.cluster import Cluster, pick_free_port
    from tests import pgbin

    with tempfile.TemporaryDirectory(prefix="scan-rate-") as root:
        Path(root).chmod(0o755)
        with Cluster(pgbin.bindir(17), Path(root) / "pg", pick_free_port()) as cluster:
            with psycopg.connect(cluster.url(), autocommit=True) as conn:
                conn.execute("CREATE DATABASE jobserver TEMPLATE template0")
            url = cluster.url("jobserver")
            with psycopg.connect(url) as conn:
                data.load(conn, rows=rows)
            print(measure(url, cluster.bindir, rows).describe())


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
