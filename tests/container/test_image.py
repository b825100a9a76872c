"""The image built from the real Dockerfile, run end to end against a real PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.container.conftest import (
    IMAGE_PG_MAJOR,
    IMAGE_UID,
    ROOT,
    Docker,
    Source,
    run,
    run_args,
    start_cluster,
)
from tests.container.sentry_listener import SentryListener
from tests.seed import demo

pytestmark = [pytest.mark.container, pytest.mark.slow]

SCRATCH = "temp_scrubbed_schema"
PASSWORD = "Pw-in-the-url-0451"  # trust auth ignores it; it must not show in any output
IMAGE_SIZE_BUDGET = 450e6  # with the embedded server; about 185 MB without it


def _log_lines(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _restore(docker: Docker, image: str, storage: Path, source: Source) -> str:
    """pg_restore the published dump, with the image's own client, into a new database."""
    target = source.create_database("restored")
    result = run(
        docker,
        image,
        *("pg_restore", "--exit-on-error", "--no-owner", "--dbname", source.url(target)),
        "/storage/sanitised.dump",
        volumes=[f"{storage}:/storage:ro"],
    )
    assert result.returncode == 0, result.stderr
    return target


def test_image_is_small_and_labelled(docker: Docker, image: str) -> None:
    info = json.loads(docker("image", "inspect", image, check=True).stdout)[0]
    assert info["Size"] < IMAGE_SIZE_BUDGET, f"image grew to {info['Size'] / 1e6:.0f} MB"
    config = info["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["/app/entrypoint.sh"]
    assert "/storage" in config["Volumes"]
    assert config["Labels"]["org.opencontainers.image.title"] == "sanitised-dump"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PG_MAJOR"] == str(IMAGE_PG_MAJOR)


def test_pg_dump_and_psycopg_share_debians_libpq(docker: Docker, image: str) -> None:
    probe = (
        "import psycopg, subprocess; "
        "print(psycopg.pq.__impl__, psycopg.pq.version() // 10000); "
        "print(subprocess.run(['pg_dump', '--version'], capture_output=True, text=True).stdout)"
    )
    result = run(docker, image, "python", "-c", probe)
    assert result.returncode == 0, result.stderr
    impl_line, pg_dump_line = result.stdout.splitlines()[:2]
    assert impl_line == f"python {IMAGE_PG_MAJOR}"
    assert pg_dump_line.startswith(f"pg_dump (PostgreSQL) {IMAGE_PG_MAJOR}.")
    # No compiler and no pip in the runtime image, and nothing left of the build's apt setup.
    result = run(docker, image, "sh", "-c", "command -v gcc cc pip pip3 || true")
    assert result.stdout.strip() == ""
    result = run(docker, image, "ls", "-A", "/etc/apt/apt.conf.d", "/run/secrets")
    assert result.returncode == 0, result.stderr
    assert "00build" not in result.stdout
    assert result.stdout.rstrip().endswith("/run/secrets:")  # an empty mount point


def test_dump_end_to_end(docker: Docker, image: str, source: Source, storage: Path) -> None:
    result = run(
        docker,
        image,
        env={"DATABASE_URL": source.url("demo", PASSWORD)},
        volumes=[f"{storage}:/storage"],
    )
    assert result.returncode == 0, result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    summary = _log_lines(result.stderr)[-1]
    assert summary["message"] == "run finished" and summary["exit_code"] == 0

    published = storage / "sanitised.dump"
    st = published.stat()
    assert st.st_mode & 0o777 == 0o600
    assert st.st_uid == IMAGE_UID  # written by the image's non-root user
    assert sorted(p.name for p in storage.iterdir()) == ["sanitised.dump"]
    assert source.scratch_schemas("demo") == []

    restored = _restore(docker, image, storage, source)
    with psycopg.connect(source.url(restored)) as conn:
        users = conn.execute(f"SELECT count(*) FROM {SCRATCH}.users").fetchone()
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", [SCRATCH]
            )
        }
    assert users == (400,)
    listed = {key.rpartition(".")[2] for key in demo.TABLES.keys() - demo.UNLISTED}
    assert listed <= tables
    assert "api_sessions" not in tables  # not in the allow list: not copied


def test_embedded_scratch_server_and_restore_from_the_image(
    docker: Docker, image: str, source: Source, storage: Path
) -> None:
    """SCRATCH_DATABASE_URL=embedded: the image's own server holds the copy, the source is
    only read; the image's `restore` puts the dump into an empty database as it was."""
    before = source.scratch_schemas("demo")
    result = run(
        docker,
        image,
        env={"DATABASE_URL": source.url("demo", PASSWORD), "SCRATCH_DATABASE_URL": "embedded"},
        volumes=[f"{storage}:/storage"],
    )
    assert result.returncode == 0, result.stderr
    lines = _log_lines(result.stderr)
    assert {line.get("mode") for line in lines} == {"embedded"}
    assert lines[-1]["message"] == "run finished"
    # The throwaway server's data folder is gone; the flock file stays (removing it is racy).
    assert sorted(p.name for p in storage.iterdir()) == [
        ".sanitised-dump-sanitised.dump.lock",
        "sanitised.dump",
    ]
    assert source.scratch_schemas("demo") == before == []

    target = source.create_database("embedded")
    restored = run(
        docker,
        image,
        "restore",
        "--target",
        source.url(target, PASSWORD),
        volumes=[f"{storage}:/storage:ro"],
    )
    assert restored.returncode == 0, restored.stderr
    assert PASSWORD not in restored.stdout + restored.stderr
    with psycopg.connect(source.url(target)) as conn:
        users = conn.execute("SELECT count(*) FROM public.users").fetchone()
        invoices = conn.execute("SELECT count(*) FROM billing.invoices").fetchone()
        canaries = conn.execute(
            "SELECT count(*) FROM public.users WHERE email::text LIKE '%canary%'"
        ).fetchone()
    assert users == (demo.TABLES["public.users"],)
    assert invoices == (demo.TABLES["billing.invoices"],)
    assert canaries == (0,)


def test_process_runs_as_non_root(docker: Docker, image: str) -> None:
    result = run(docker, image, "id", "-u")
    assert result.stdout.strip() == str(IMAGE_UID)


def test_user_flag_publishes_a_dump_owned_by_that_user(
    docker: Docker, image: str, source: Source, storage: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the folder to another uid")
    os.chown(storage, 12345, 12345)
    storage.chmod(0o700)
    result = run(
        docker,
        image,
        env={"DATABASE_URL": source.demo_url},
        volumes=[f"{storage}:/storage"],
        options=["--user", "12345:12345"],
    )
    assert result.returncode == 0, result.stderr
    st = (storage / "sanitised.dump").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (12345, 12345, 0o600)


def test_kubernetes_security_context_is_enough(
    docker: Docker, image: str, source: Source, storage: Path
) -> None:
    """What cronjob.yaml asks for: read-only root, no capabilities, no privilege escalation."""
    result = run(
        docker,
        image,
        env={"DATABASE_URL": source.demo_url},
        volumes=[f"{storage}:/storage"],
        options=[
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
        ],
    )
    assert result.returncode == 0, result.stderr
    assert (storage / "sanitised.dump").stat().st_size > 0


def test_read_only_storage_exits_2_with_a_clear_message(
    docker: Docker, image: str, source: Source, storage: Path
) -> None:
    old = storage / "sanitised.dump"
    old.write_bytes(b"yesterday's dump")
    result = run(
        docker,
        image,
        env={"DATABASE_URL": source.demo_url},
        volumes=[f"{storage}:/storage:ro"],
    )
    assert result.returncode == 2
    (line,) = _log_lines(result.stderr)
    assert line["exit_code"] == 2
    assert "/storage (STORAGE_DIR) is not writable" in line["message"]
    assert "Read-only file system" in line["message"]
    assert old.read_bytes() == b"yesterday's dump"


def test_read_only_commands_need_no_storage(docker: Docker, image: str, source: Source) -> None:
    result = run(
        docker,
        image,
        "check",
        env={"DATABASE_URL": source.demo_url, "STORAGE_DIR": "/nonexistent"},
    )
    assert result.returncode == 0, result.stderr
    result = run(docker, image, "python", "-m", "app", "--version")
    assert result.returncode == 0 and "sanitised-dump" in result.stdout


# --- SIGTERM in the middle of the copy --------------------------------------------

SLOW_SOURCE = """
CREATE FUNCTION public.slow_visible(id integer) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.02); RETURN true; END $$;
CREATE TABLE public.slow (id integer PRIMARY KEY, v integer NOT NULL, secret text);
INSERT INTO public.slow SELECT g, g, 'canary ' || g FROM generate_series(1, 2000) g;
-- Row-level security is not copied into the scratch table, but it filters the
-- source rows the copy reads: each one costs 20 ms, so the INSERT runs ~40 s.
ALTER TABLE public.slow ENABLE ROW LEVEL SECURITY;
CREATE POLICY slow_read ON public.slow FOR SELECT USING (public.slow_visible(id));
"""


@pytest.fixture
def slow_source(source: Source) -> Iterator[tuple[str, Path]]:
    """A database whose copy takes long, read by a role with only the privileges SPEC §6 needs."""
    dbname = source.create_database("slow")
    role = f"sanitiser_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(source.cluster.url(dbname), autocommit=True) as conn:
        conn.execute(SLOW_SOURCE)
        conn.execute(f"CREATE ROLE {role} LOGIN")  # not a superuser: RLS applies
        conn.execute(f"GRANT CONNECT, CREATE ON DATABASE {dbname} TO {role}")
        conn.execute(f"GRANT SELECT ON public.slow TO {role}")
    folder = Path(tempfile.mkdtemp(prefix="sdump-allow-"))
    folder.chmod(0o755)
    allow_list = folder / "allow_list.json"
    allow_list.write_text(json.dumps({"slow": ["id", "v"]}))
    allow_list.chmod(0o644)
    url = f"postgresql://{role}@127.0.0.1:{source.cluster.port}/{dbname}"
    yield url, allow_list
    shutil.rmtree(folder)


def _app_sessions(source: Source) -> list[tuple[Any, ...]]:
    with psycopg.connect(source.cluster.url(), autocommit=True) as conn:
        return conn.execute(
            "SELECT wait_event, query FROM pg_stat_activity"
            " WHERE application_name = 'sanitised-dump' AND pid <> pg_backend_pid()"
        ).fetchall()


def test_sigterm_mid_copy_drops_the_scratch_schema_and_keeps_the_old_dump(
    docker: Docker,
    image: str,
    source: Source,
    storage: Path,
    slow_source: tuple[str, Path],
) -> None:
    url, allow_list = slow_source
    old = storage / "sanitised.dump"
    old.write_bytes(b"the dump of yesterday")
    if os.geteuid() == 0:
        os.chown(old, IMAGE_UID, IMAGE_UID)
    name = f"sdump-sigterm-{uuid.uuid4().hex[:8]}"
    args = run_args(
        image,
        env={"DATABASE_URL": url},
        # A mounted file replaces the image's allow list.
        volumes=[f"{storage}:/storage", f"{allow_list}:/app/allow_list.json:ro"],
        name=name,
    )
    job = subprocess.Popen(
        [docker.cli, *args],
        env={**os.environ, "DATABASE_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            copying = [
                s for s in _app_sessions(source) if s[0] == "PgSleep" and f'"{SCRATCH}"' in s[1]
            ]
            if copying:
                break
            assert job.poll() is None, f"the job ended before the copy: {job.communicate()}"
            assert time.monotonic() < deadline, "the copy never started"
            time.sleep(0.1)
        assert copying[0][1].startswith(f'INSERT INTO "{SCRATCH}"')

        started = time.monotonic()
        docker("stop", "--time", "30", name, check=True)
        _, stderr = job.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        if job.poll() is None:
            docker("rm", "--force", name)
            job.kill()

    assert job.returncode == 143, stderr  # 128 + SIGTERM: the job's own exit, not a SIGKILL
    assert took < 20
    assert _log_lines(stderr)[-1]["exit_code"] == 143
    dbname = url.rsplit("/", 1)[1]
    assert source.scratch_schemas(dbname) == []
    assert _app_sessions(source) == []  # the INSERT was cancelled, not left running
    assert old.read_bytes() == b"the dump of yesterday"
    assert [p.name for p in storage.iterdir()] == ["sanitised.dump"]


# --- a server newer than the image's pg_dump ---------------------------------------


def test_a_newer_server_stops_the_job_before_it_writes(
    docker: Docker, image: str, storage: Path, cluster_root: Path
) -> None:
    major = IMAGE_PG_MAJOR + 1
    cluster = start_cluster(major, cluster_root)
    try:
        result = run(
            docker,
            image,
            env={"DATABASE_URL": cluster.url()},
            volumes=[f"{storage}:/storage"],
        )
        with psycopg.connect(cluster.url()) as conn:
            scratch = conn.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname = %s", [SCRATCH]
            ).fetchone()
    finally:
        cluster.destroy()
    assert result.returncode == 5, result.stderr
    message = _log_lines(result.stderr)[-1]["message"]
    assert str(IMAGE_PG_MAJOR) in message and str(major) in message
    assert scratch == (0,)
    assert list(storage.iterdir()) == []


# --- Sentry -------------------------------------------------------------------------


def test_the_images_sentry_sdk_delivers_checkins(docker: Docker, image: str) -> None:
    """app.monitoring inside the image, with the image's sentry-sdk, reaches the listener."""
    probe = (
        "import os; from app import monitoring\n"
        "with monitoring.checkin(os.environ) as run:\n"
        "    run.exit_code = 0\n"
    )
    with SentryListener().running() as sentry:
        result = run(docker, image, "python", "-c", probe, env={"SENTRY_DSN": sentry.dsn()})
        checkins = list(sentry.checkins)
    assert result.returncode == 0, result.stderr
    assert [c["status"] for c in checkins] == ["in_progress", "ok"]


def test_sentry_checkins_from_the_image(
    docker: Docker, image: str, source: Source, storage: Path
) -> None:
    with SentryListener().running() as sentry:
        env = {
            "DATABASE_URL": source.demo_url,
            "SENTRY_DSN": sentry.dsn(),
            "SENTRY_MONITOR_SLUG": "container-test",
            "SENTRY_MONITOR_SCHEDULE": "0 3 * * *",
        }
        ok = run(docker, image, env=env, volumes=[f"{storage}:/storage"])
        # A run that fails in the app (a table the database lacks): an error check-in.
        failing = {**env, "ALLOW_LIST": "/tmp/missing-table.json"}
        bad = run(
            docker,
            image,
            "sh",
            "-c",
            "echo '{\"no_such_table\": []}' > /tmp/missing-table.json && exec /app/entrypoint.sh",
            env=failing,
            volumes=[f"{storage}:/storage"],
        )
        checkins = list(sentry.checkins)
    assert ok.returncode == 0, ok.stderr
    assert bad.returncode == 3, bad.stderr
    assert [c["status"] for c in checkins] == ["in_progress", "ok", "in_progress", "error"]
    assert {c["monitor_slug"] for c in checkins} == {"container-test"}
    assert checkins[0]["monitor_config"]["schedule"]["value"] == "0 3 * * *"
    assert checkins[0]["check_in_id"] == checkins[1]["check_in_id"]


# --- compose.test.yml, its services' commands against the local server ----------------


def _service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = yaml.safe_load((ROOT / "compose.test.yml").read_text())["services"][
        name
    ]
    return service


def _to_local(env: dict[str, str], source: Source) -> dict[str, str]:
    """The service's environment, its `db:5432` replaced by the local server."""
    return {
        key: value.replace(
            "postgres:postgres@db:5432", f"postgres:postgres@127.0.0.1:{source.cluster.port}"
        )
        for key, value in env.items()
    }


def test_compose_file_is_valid_for_docker_compose() -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (.ci/docker-setup.sh installs it)")
    result = subprocess.run(
        [compose, "-f", str(ROOT / "compose.test.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_compose_sanitiser_command(
    docker: Docker, image: str, source: Source, storage: Path
) -> None:
    service = _service("sanitiser")
    assert service["build"]["args"]["PG_MAJOR"] == f"${{PG_MAJOR:-{IMAGE_PG_MAJOR}}}"
    (volume,) = service["volumes"]
    assert volume.startswith("./storage:")
    result = run(
        docker,
        image,
        *service["command"],
        env=_to_local(service["environment"], source),
        volumes=[f"{storage}:{volume.split(':')[1]}"],
    )
    assert result.returncode == 0, result.stderr
    assert (storage / "sanitised.dump").stat().st_mode & 0o777 == 0o600


def test_compose_tests_command(docker: Docker, test_image: str, source: Source) -> None:
    """The suite inside the image, against one server: what `compose run tests` does."""
    service = _service("tests")
    assert service["build"]["target"] == "test"
    result = run(
        docker,
        test_image,
        *service["command"],
        env=_to_local(service["environment"], source),
        timeout=1800,
    )
    tail = "\n".join(result.stdout.splitlines()[-40:])
    assert result.returncode == 0, tail + result.stderr[-2000:]
    assert " passed" in tail
