"""The Dockerfile, .dockerignore and the lock files it installs from, checked statically."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from presence_svc.web.rest import ROUTES
from tests.deploy.artifacts import (
    BUILD_LOCK,
    DOCKERIGNORE,
    PLACEHOLDER_SECRETS,
    ROOT,
    RUNTIME_LOCK,
    base_python_version,
    closure_problems,
    copy_sources,
    dockerfile,
    entrypoint,
    env_pairs,
    exec_form,
    from_image,
    healthcheck_command,
    image_markers,
    lock_problems,
    parse_dockerfile,
    parse_lock,
    pip_problems,
    pyproject,
    runtime_requirements,
    served_port,
    settings_from_env,
    stages,
    unknown_settings,
)

ROUTE_PATHS = {route.path for route in ROUTES}


def runtime_stage() -> list[str]:
    return [f"{i.keyword} {i.args}" for i in stages(dockerfile())[-1]]


def final_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stages(dockerfile())[-1]:
        if instruction.keyword == "ENV":
            env.update(env_pairs(instruction.args))
    return env


def test_multi_stage_build_from_one_pinned_python_slim_base() -> None:
    all_stages = stages(dockerfile())
    assert len(all_stages) >= 2, "a builder stage and a runtime stage"
    images = {from_image(stage[0])[0] for stage in all_stages}
    # The runtime copies the builder's virtualenv, whose interpreter links must still resolve.
    assert len(images) == 1, f"every stage must use the same base image: {images}"
    assert base_python_version().startswith("3.11."), "the python:3.11 line, pinned to a patch"
    builder_names = {from_image(stage[0])[1] for stage in all_stages[:-1]}
    copies_from = [
        i.args for i in all_stages[-1] if i.keyword == "COPY" and i.args.startswith("--from=")
    ]
    assert copies_from, "the runtime stage must take what it needs from the builder"
    for args in copies_from:
        assert args.split()[0].removeprefix("--from=") in builder_names


def test_runtime_stage_installs_nothing_itself() -> None:
    # Only the builder touches package managers; the runtime just receives the virtualenv.
    for line in runtime_stage():
        if line.startswith("RUN "):
            assert not re.search(r"\b(pip|apt-get|apt|apk)\b", line), line


def test_runs_as_a_numeric_non_root_user() -> None:
    users = [line.split(None, 1)[1] for line in runtime_stage() if line.startswith("USER ")]
    assert users, "the runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it without the image's /etc/passwd.
    assert uid.isdigit() and int(uid) > 0, f"USER {users[-1]} must be a numeric non-root uid"
    assert gid == "" or (gid.isdigit() and int(gid) > 0), f"USER {users[-1]}: numeric gid"


def test_entrypoint_is_exec_form_serving_on_all_interfaces() -> None:
    from presence_svc.cli import parser

    argv = entrypoint()
    scripts = pyproject()["project"]["scripts"]
    assert argv[0] in scripts, f"{argv[0]} is not a console script of the project"
    args = parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert args.host == "0.0.0.0"
    assert f"EXPOSE {args.port}" in runtime_stage()
    # A CMD would be appended to the ENTRYPOINT's argv; a shell form would put sh in front.
    assert not [line for line in runtime_stage() if line.startswith("CMD ")]


def test_exec_form_parser_rejects_shell_forms() -> None:
    assert exec_form('["presence-svc", "serve"]') == ["presence-svc", "serve"]
    assert exec_form("presence-svc serve --port 8000") is None
    assert exec_form("['presence-svc', 'serve']") is None  # not JSON: Docker runs it via sh


def test_healthcheck_uses_python_stdlib_on_healthz() -> None:
    checks = [i.args for i in stages(dockerfile())[-1] if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1, "one HEALTHCHECK in the runtime stage"
    command = healthcheck_command(checks[0])
    assert command is not None, "HEALTHCHECK CMD must be exec form"
    assert command[0] == "python", "slim has no curl or wget; the image's Python has urllib"
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(command))
    assert len(urls) == 1
    url = urlsplit(urls[0])
    assert url.hostname in {"127.0.0.1", "localhost"}
    assert url.port == served_port()
    assert url.path == "/healthz" and url.path in ROUTE_PATHS


def test_runtime_env_suits_a_read_only_root_and_log_shippers() -> None:
    env = final_env()
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PRESENCE_LOG_FORMAT") == "json"


def test_runtime_env_presence_variables_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    presence = {k: v for k, v in final_env().items() if k.startswith("PRESENCE_")}
    assert unknown_settings(presence) == []
    settings = settings_from_env(monkeypatch, {**PLACEHOLDER_SECRETS, **presence})
    assert settings.log_format == "json"


def test_pip_installs_only_from_hashed_locks() -> None:
    instructions = dockerfile()
    copied = copy_sources(instructions)
    assert pip_problems(instructions, copied) == []
    lock_paths = {str(lock.relative_to(ROOT)) for lock in (RUNTIME_LOCK, BUILD_LOCK)}
    assert lock_paths <= copied, "both locks must reach the builder"


def test_pip_check_flags_unhashed_and_unpinned_installs() -> None:
    bad = parse_dockerfile(
        "FROM python:3.11.17-slim AS b\n"
        "COPY deploy/requirements.lock ./\n"
        "RUN pip install -r requirements-dev.txt \\\n"
        "    && pip install --no-deps redis\n"
    )
    problems = pip_problems(bad, copy_sources(bad))
    assert any("lacks --require-hashes" in p for p in problems)
    assert any("lacks --no-deps" in p for p in problems)
    assert any("outside a hashed lock: ['redis']" in p for p in problems)
    assert any("which no COPY brings in" in p for p in problems)


def test_every_copy_source_exists_and_passes_dockerignore() -> None:
    sources = copy_sources(dockerfile())
    assert sources
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    # An allow-list: everything excluded, then exactly what the build needs let back in.
    assert patterns[0] == "*", ".dockerignore should start by excluding everything"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        allowed = [i for i, p in enumerate(patterns) if p.rstrip("/") == f"!{source}"]
        assert allowed, f".dockerignore does not let {source} into the build context"
        later = [p for p in patterns[allowed[-1] + 1 :] if not p.startswith("!")]
        assert not [p for p in later if fnmatch.fnmatch(source, p)], source


@pytest.mark.parametrize("lock", [RUNTIME_LOCK, BUILD_LOCK], ids=lambda p: p.name)
def test_lock_pins_every_line_with_hashes(lock: Path) -> None:
    assert lock_problems(lock.read_text()) == []


def test_lock_check_flags_loose_and_unhashed_lines() -> None:
    problems = lock_problems(
        "--index-url https://mirror.example/simple\n"
        "redis>=5 \\\n    --hash=sha256:00\n"
        "msgpack==1.0.8\n"
    )
    assert any("option line" in p for p in problems)
    assert any("redis is not pinned" in p for p in problems)
    assert any("msgpack has no sha256" in p for p in problems)


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_runtime_lock_pins_every_runtime_dependency(machine: str) -> None:
    env = image_markers(base_python_version(), machine)
    assert closure_problems(RUNTIME_LOCK.read_text(), runtime_requirements(), env) == []


def test_runtime_lock_covers_extras_and_is_only_the_dependencies() -> None:
    pins = {p.name: p for p in parse_lock(RUNTIME_LOCK.read_text())[0]}
    # uvicorn[standard], redis[hiredis] and PyJWT[crypto] bring these in; a lock compiled
    # without the extras would lack them.
    for extra_dependency in ("uvloop", "httptools", "websockets", "hiredis", "cryptography"):
        assert extra_dependency in pins, extra_dependency
    # The project itself is built from source in the image, never taken from an index.
    assert "presence-svc" not in pins


def test_closure_check_flags_a_missing_dependency() -> None:
    env = image_markers(base_python_version(), "x86_64")
    lock = "\n".join(
        line for line in RUNTIME_LOCK.read_text().split("\n") if not line.startswith("uvloop==")
    )
    problems = closure_problems(lock, runtime_requirements(), env)
    assert any(p.startswith("uvloop ") for p in problems), problems


def test_lock_resolved_for_the_image_python() -> None:
    header = re.search(
        r"autogenerated by pip-compile with Python (\d+\.\d+)", RUNTIME_LOCK.read_text()
    )
    assert header, "regenerate deploy/requirements.lock with the command in deploy/README.md"
    assert base_python_version().startswith(header.group(1) + ".")


def test_build_lock_pins_the_build_backend() -> None:
    pins = {p.name: p for p in parse_lock(BUILD_LOCK.read_text())[0]}
    assert "pip" in pins
    for requirement in pyproject()["build-system"]["requires"]:
        wanted = Requirement(requirement)
        pin = pins.get(wanted.name)
        assert pin is not None and pin.version is not None, f"{wanted.name} is not pinned"
        assert SpecifierSet(str(wanted.specifier)).contains(pin.version), (wanted, pin.version)
