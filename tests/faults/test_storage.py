"""The storage folder: missing, read-only, full, or in the way of the publish."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from app import publish
from tests import jobrun
from tests.faults.harness import Source

REPORT_SECTION = "Storage"


@contextmanager
def listener() -> Iterator[tuple[str, socket.socket]]:
    """A DATABASE_URL whose 'server' records any connection: proof the job never dialled."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        yield f"postgresql://dumper:secret@127.0.0.1:{port}/prod", sock


def never_connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[bool]:
    """Mount a tmpfs on `path` (root only); yields whether it could."""
    path.mkdir(exist_ok=True)
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.fault(
    "STORAGE_DIR does not exist", "exit 2 naming STORAGE_DIR; no connection to the database"
)
def test_storage_dir_missing(tmp_path: Path, observe: Callable[[str], None]) -> None:
    with listener() as (url, sock):
        env = jobrun.job_env(url, tmp_path / "no-such-folder", tmp_path)
        result = jobrun.run(env, "dump")
        assert never_connected(sock)
    assert result.returncode == 2, result.stderr
    assert "STORAGE_DIR" in result.messages() and "no-such-folder" in result.messages()
    observe(f"exit {result.returncode}, no connection attempt")


@pytest.mark.fault(
    "STORAGE_DIR is read-only (a read-only mount)",
    "exit 2 naming STORAGE_DIR; no connection to the database",
)
def test_storage_dir_read_only(tmp_path: Path, observe: Callable[[str], None]) -> None:
    storage = tmp_path / "storage"
    with tmpfs(storage, "ro,size=64k") as mounted:
        if not mounted:
            if os.geteuid() == 0:
                pytest.skip("cannot mount a read-only tmpfs here, and root writes anywhere")
            storage.chmod(0o555)
        with listener() as (url, sock):
            result = jobrun.run(jobrun.job_env(url, storage, tmp_path), "dump")
            assert never_connected(sock)
        assert not list(storage.iterdir())
    assert result.returncode == 2, result.stderr
    assert "not writable" in result.messages() and str(storage) in result.messages()
    observe(f"exit {result.returncode}, no connection attempt")


@pytest.mark.one_major
@pytest.mark.fault(
    "the storage folder fills up while pg_dump writes (a 64 kB tmpfs; RLIMIT_FSIZE when "
    "mounting is not allowed)",
    "exit 5; partial file removed; previous dump byte-identical; scratch schema dropped",
)
def test_storage_full_during_pg_dump(
    source: Source, tmp_path: Path, observe: Callable[[str], None]
) -> None:
    source.execute(
        "CREATE TABLE blobs (id integer PRIMARY KEY, data text NOT NULL);"
        " INSERT INTO blobs SELECT i, md5(i::text) || md5((-i)::text) || md5((2 * i)::text)"
        " FROM generate_series(1, 4000) AS i"
    )
    source.write_allow({"people": ["id"], "blobs": ["id", "data"]})
    small = tmp_path / "small"
    with tmpfs(small, "size=64k") as mounted:
        if mounted:
            source.storage = small
            source.dump.write_bytes(source.previous)
            result = source.run()
            how = "tmpfs"
        else:
            limit = 64 * 1024
            proc = subprocess.run(
                [sys.executable, "-m", "app", "dump"],
                env=source.env(),
                cwd=jobrun.REPO,
                capture_output=True,
                text=True,
                timeout=300,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
            )
            result = jobrun.Result(proc.returncode, proc.stderr, proc.stdout)
            how = "RLIMIT_FSIZE"
        assert result.returncode in (5, 6), result.stderr
        observe(f"exit {result.returncode} ({how})")
        source.assert_clean()


@pytest.mark.one_major
@pytest.mark.fault(
    "the publish fails: the dump's name is taken by a folder",
    "exit 6 naming the path; the temp file removed; the folder untouched; scratch dropped",
)
def test_publish_fails(source: Source, observe: Callable[[str], None]) -> None:
    source.dump.unlink()
    source.dump.mkdir()
    (source.dump / "keep.txt").write_text("mine")
    result = source.run()
    assert result.returncode == 6, result.stderr
    assert str(source.dump) in result.messages()
    assert [p.name for p in source.dump.iterdir()] == ["keep.txt"]
    assert jobrun.temp_files(source.storage) == []
    assert "scratch schema dropped" in result.messages()
    observe(f"exit {result.returncode}")


@pytest.mark.fault(
    "DUMP_NAME with glob characters (`*`, `[x]`) beside temp files of other dumps",
    "stale-file cleanup removes only this dump's own temp files",
)
def test_stale_cleanup_takes_dump_name_literally(
    tmp_path: Path, observe: Callable[[str], None]
) -> None:
    names = ("*", "[s]anitised.dump", "sanitised.dump")
    for dump_name in names:
        own = publish.create_temp(tmp_path, dump_name)
        others = [
            tmp_path / "tmp-sanitised-dump-sanitised.dump-eu-abcdefgh",
            tmp_path / "tmp-sanitised-dump-other-abcdefgh",
            tmp_path / "tmp-sanitised-dump-sanitised.dump",
            tmp_path / "sanitised.dump",
        ]
        for path in others:
            path.write_text("x")
        assert publish.remove_stale(tmp_path, dump_name) == [own]
        assert all(path.exists() for path in others)
    observe(f"{len(names)} names, each removed its own temp file and none of 4 others")
