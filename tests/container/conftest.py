"""Fixtures for the container tests: a Docker engine, the image, and a source server.

The image is built from the real Dockerfile (BuildKit's cache makes a rebuild
of unchanged sources take a second or two), unless SANITISED_DUMP_IMAGE names
one to test as it is. Without a Docker engine every test here skips, with the
reason; CI (REQUIRE_NO_SKIPS=1) turns that skip into a failure. `.ci/docker-setup.sh`
makes a machine ready.

Containers use the host's network (this machine's dockerd runs without a
bridge), so they reach the throwaway server on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from app.cluster import Cluster, pick_free_port
from tests import pgbin
from tests.seed import demo

ROOT = Path(__file__).resolve().parents[2]
CA_BUNDLE = Path(os.environ.get("CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))
IMAGE_TAG = "sanitised-dump:test"
TEST_IMAGE_TAG = "sanitised-dump-tests:test"
IMAGE_PG_MAJOR = 17  # the Dockerfile's default PG_MAJOR: what this machine can build
IMAGE_UID = 10001
BUILD_TIMEOUT = 1200


def docker_cli() -> str:
    """Debian's CLI builds with BuildKit by itself; a newer one without buildx does not."""
    if os.environ.get("DOCKER"):
        return os.environ["DOCKER"]
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    return shutil.which("docker") or "docker"


@dataclass
class Docker:
    cli: str

    def __call__(
        self, *args: str, timeout: float = 300, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.cli, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            pytest.fail(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    def build(self, tag: str, *extra: str) -> None:
        args = ["build", "--network=host", "--tag", tag, *extra]
        if CA_BUNDLE.is_file():
            args += ["--secret", f"id=ca,src={CA_BUNDLE}"]
        result = subprocess.run(
            [self.cli, *args, str(ROOT)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            env={**os.environ, "DOCKER_BUILDKIT": "1"},
            check=False,
        )
        if result.returncode != 0:
            hint = ""
            if self("image", "inspect", "debian:trixie-slim").returncode != 0:
                hint = "\n(no debian:trixie-slim and no registry? run .ci/docker-setup.sh)"
            pytest.fail(f"docker build of {tag} failed:\n{result.stderr[-4000:]}{hint}")


@pytest.fixture(scope="session")
def docker() -> Docker:
    cli = docker_cli()
    try:
        info = subprocess.run(
            [cli, "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"no Docker engine answers ({cli}: {exc}); run .ci/docker-setup.sh")
    if info.returncode != 0 or not info.stdout.strip():
        reason = info.stderr.strip().splitlines()[-1:] or ["no answer"]
        pytest.skip(f"no Docker engine answers ({reason[0]}); run .ci/docker-setup.sh")
    return Docker(cli)


@pytest.fixture(scope="session")
def image(docker: Docker) -> str:
    """The job image: SANITISED_DUMP_IMAGE as given, or built from this checkout."""
    given = os.environ.get("SANITISED_DUMP_IMAGE")
    if given:
        docker("image", "inspect", given, check=True)
        return given
    docker.build(IMAGE_TAG)
    return IMAGE_TAG


@pytest.fixture(scope="session")
def test_image(docker: Docker, image: str) -> str:
    """The Dockerfile's `test` target (compose.test.yml's `tests` service)."""
    docker.build(TEST_IMAGE_TAG, "--target", "test")
    return TEST_IMAGE_TAG


@dataclass
class Source:
    """A throwaway server on 127.0.0.1 with the demo database loaded."""

    cluster: Cluster
    major: int
    demo_url: str

    def url(self, dbname: str, password: str | None = None) -> str:
        user = "postgres" if password is None else f"postgres:{password}"
        return f"postgresql://{user}@127.0.0.1:{self.cluster.port}/{dbname}"

    def create_database(self, prefix: str = "ct") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.cluster.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def scratch_schemas(self, dbname: str) -> list[str]:
        with psycopg.connect(self.url(dbname)) as conn:
            rows = conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname = 'temp_scrubbed_schema'"
            ).fetchall()
        return [r[0] for r in rows]


def start_cluster(major: int, root: Path) -> Cluster:
    cluster = Cluster(pgbin.bindir(major), root / f"pg{major}", pick_free_port())
    cluster.__enter__()
    return cluster


@pytest.fixture(scope="session")
def cluster_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="sdump-ct-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def source(docker: Docker, cluster_root: Path) -> Iterator[Source]:
    """A server the image's pg_dump can dump (CONTAINER_PG_MAJOR, default the image's)."""
    major = int(os.environ.get("CONTAINER_PG_MAJOR", IMAGE_PG_MAJOR))
    cluster = start_cluster(major, cluster_root)
    try:
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE demo")
        with psycopg.connect(cluster.url("demo")) as conn:
            demo.load(conn)
        yield Source(cluster, major, cluster.url("demo"))
    finally:
        cluster.destroy()


@pytest.fixture
def storage() -> Iterator[Path]:
    """A host folder for /storage, owned by the image's user (as docker -v would need)."""
    folder = Path(tempfile.mkdtemp(prefix="sdump-storage-"))
    folder.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(folder, IMAGE_UID, IMAGE_UID)
    else:
        folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def run_args(
    image: str,
    *command: str,
    env: dict[str, str] | None = None,
    volumes: Sequence[str] = (),
    options: Sequence[str] = (),
    name: str | None = None,
) -> list[str]:
    """`docker run` arguments; the environment goes by name only (-e NAME), never by value."""
    args = ["run", "--rm", "--network=host", *options]
    if name:
        args += ["--name", name]
    for key in env or {}:
        args += ["-e", key]
    for volume in volumes:
        args += ["-v", volume]
    return [*args, image, *command]


def run(
    docker: Docker,
    image: str,
    *command: str,
    env: dict[str, str] | None = None,
    volumes: Sequence[str] = (),
    options: Sequence[str] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    args = run_args(image, *command, env=env, volumes=volumes, options=options)
    return subprocess.run(
        [docker.cli, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
