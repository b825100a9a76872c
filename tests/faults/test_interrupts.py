"""SIGTERM, SIGINT and SIGKILL in the middle of a run: nothing stays on the source, no
temporary file stays in the storage folder, the published dump is the previous one, and the
next run cleans up after a killed one (and only after itself)."""

from __future__ import annotations

import json
import select
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import jobrun
from tests.faults import harness
from tests.faults.harness import SLOW, Source
from tests.jobrun import SCRATCH

REPORT_SECTION = "Interruption"
CATCHABLE = [signal.SIGTERM, signal.SIGINT]


def messages(result: jobrun.Result) -> list[str]:
    return [str(line.get("message")) for line in result.logs]


@pytest.mark.parametrize("signum", CATCHABLE, ids=lambda s: s.name)
@pytest.mark.fault(
    "{signum} while the copy runs (a slow INSERT ... SELECT)",
    "exit 128+signal; the query cancelled, the scratch schema rolled back, no temp file, "
    "previous dump byte-identical",
)
def test_signal_during_the_copy(
    source: Source, signum: signal.Signals, observe: Callable[[str], None]
) -> None:
    job = source.start(PGOPTIONS=SLOW)
    harness.wait_for(lambda: harness.copy_running(source.url), "the copy", process=job)
    harness.interrupt(job, signum)
    result = harness.finish(job)
    assert result.returncode == 128 + signum, result.stderr
    assert "table copied" not in messages(result)
    assert result.logs[-1]["message"].startswith("interrupted")
    observe(f"exit {result.returncode}")
    source.assert_clean()


@pytest.mark.one_major
@pytest.mark.parametrize("signum", CATCHABLE, ids=lambda s: s.name)
@pytest.mark.fault(
    "{signum} while pg_dump runs",
    "exit 128+signal; pg_dump stopped, its partial file removed, the committed scratch "
    "schema dropped, previous dump byte-identical",
)
def test_signal_during_pg_dump(
    source: Source, signum: signal.Signals, observe: Callable[[str], None]
) -> None:
    with harness.pg_dump_stuck(source.url) as stuck:
        job = source.start()
        stuck.wait(job)
        (pg_dump,) = harness.children(job.pid)
        assert len(jobrun.temp_files(source.storage)) == 1  # pg_dump's output, half-written
        harness.interrupt(job, signum)
        result = harness.finish(job)
        assert not harness.alive(pg_dump)
    assert result.returncode == 128 + signum, result.stderr
    assert "scratch schema dropped" in messages(result)
    observe(f"exit {result.returncode}")
    source.assert_clean()


@pytest.mark.fault(
    "SIGKILL while the copy runs, then an immediate second run",
    "the killed run's server session notices and rolls back; the second run succeeds",
)
def test_sigkill_during_the_copy_then_run_again(
    source: Source, observe: Callable[[str], None]
) -> None:
    job = source.start(PGOPTIONS=SLOW)
    harness.wait_for(lambda: harness.copy_running(source.url), "the copy", process=job)
    harness.interrupt(job, signal.SIGKILL)
    # The lock's idle session ends at once; the INSERT's session is still copying.
    harness.wait_for(
        lambda: (
            not harness.job_sessions(source.url)
            or all(state == "active" for _, state, _ in harness.job_sessions(source.url))
        ),
        "the killed run's lock to be released",
    )
    again = source.run()
    assert again.returncode == 0, again.stderr
    observe(f"second run: exit {again.returncode}")
    assert SCRATCH not in jobrun.schemas(source.url)
    assert jobrun.temp_files(source.storage) == []
    assert source.dump.read_bytes() != source.previous
    harness.wait_for(lambda: not harness.job_sessions(source.url), "the sessions to end")


@pytest.mark.one_major
@pytest.mark.fault(
    "SIGKILL while pg_dump runs, then a second run; the storage folder also holds temp files "
    "of other dump names and other files",
    "pg_dump dies with the job; the second run drops the leftover schema, removes only its own "
    "stale temp file, and succeeds",
)
def test_sigkill_during_pg_dump_then_run_again(
    source: Source, observe: Callable[[str], None]
) -> None:
    others = [
        source.storage / "tmp-sanitised-dump-sanitised.dump-eu-k2j4h5g6",  # DUMP_NAME=…dump-eu
        source.storage / "tmp-sanitised-dump-other.dump-a1b2c3d4",
        source.storage / "notes.txt",
    ]
    for path in others:
        path.write_text("not this run's")
    with harness.pg_dump_stuck(source.url) as stuck:
        job = source.start()
        first = stuck.wait(job)
        (pg_dump,) = harness.children(job.pid)
        (stale,) = set(jobrun.temp_files(source.storage)) - set(others)
        harness.interrupt(job, signal.SIGKILL)
        harness.wait_for(lambda: not harness.alive(pg_dump), "pg_dump to die with the job")
        assert SCRATCH in jobrun.schemas(source.url)  # committed for pg_dump: a leftover
        # Run again while the killed pg_dump's server session would still be waiting for
        # the lock, holding locks on the leftover tables, had it not noticed its client died.
        again = source.start()
        stuck.wait(again, known={first})
    result = harness.finish(again)
    assert result.returncode == 0, result.stderr
    logs = result.logs
    assert any(line["message"] == "dropping a leftover scratch schema" for line in logs)
    removed = [line["path"] for line in logs if line["message"] == "removed a stale temporary file"]
    assert removed == [str(stale)]
    assert all(path.read_text() == "not this run's" for path in others)
    assert source.dump.read_bytes() != source.previous
    assert SCRATCH not in jobrun.schemas(source.url)
    observe(f"second run: exit {result.returncode}, removed 1 of 3 temp-looking files")


@pytest.mark.fault(
    "SIGTERM while the job waits to retry a refused connection",
    "exit 143 at once, without the remaining retries; nothing written",
)
def test_sigterm_while_retrying_to_connect(tmp_path: Path, observe: Callable[[str], None]) -> None:
    allow = tmp_path / "allow_list.json"
    allow.write_text('{"people": ["id"]}')
    env = jobrun.job_env(
        "postgresql://dumper@127.0.0.1:1/prod",
        tmp_path,
        tmp_path,
        ALLOW_LIST=str(allow),
        CONNECT_ATTEMPTS="50",
        CONNECT_WAIT="1",
    )
    job = jobrun.start(env, "dump")
    try:
        first = _next_line(job)
        assert json.loads(first)["message"] == "cannot connect, retrying", first
        job.send_signal(signal.SIGTERM)
        result = harness.finish(job, timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert result.returncode == 143, result.stderr
    assert not any(line["message"] == "cannot connect, retrying" for line in result.logs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["allow_list.json"]
    observe(f"exit {result.returncode} after 1 of 50 attempts")


def _next_line(process: subprocess.Popen[str], timeout: float = 60) -> str:
    assert process.stderr is not None
    ready, _, _ = select.select([process.stderr], [], [], timeout)
    assert ready, "the job logged nothing"
    return process.stderr.readline()
