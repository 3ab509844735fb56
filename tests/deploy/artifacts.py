"""Readers and checks for the deployment artifacts: Dockerfile, lock files, compose, nginx.
(The Kubernetes manifests have theirs in tests/deploy/k8s.py.)

No Docker engine or cluster is needed: every artifact is parsed statically. Each check returns
a list of problems (empty when the artifact is right), so that the tests can also feed it a
broken copy and see it complain.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from presence_svc.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
RUNTIME_LOCK = DEPLOY / "requirements.lock"
BUILD_LOCK = DEPLOY / "build-requirements.lock"

# Values for the two settings that come from the Secret, so that the rest can be validated.
PLACEHOLDER_SECRETS = {
    "PRESENCE_REDIS_URL": "redis://redis.example:6379/0",
    "PRESENCE_JWT_SECRET": "placeholder-secret-0123456789abcdef0123456789",
}


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


# --- settings -------------------------------------------------------------------------------


def setting_env_names() -> set[str]:
    """Every environment variable Settings reads: PRESENCE_ + a field name, upper case."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def unknown_settings(names: Iterable[str]) -> list[str]:
    known = setting_env_names()
    return sorted(f"{name} is not a setting" for name in names if name not in known)


def settings_from_env(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str]) -> Settings:
    """Settings as a node started with exactly `env` would read them (SettingsError if not)."""
    for name in list(os.environ):
        if name.upper().startswith("PRESENCE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


# --- Dockerfile -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuations joined and comments dropped, as Docker reads them."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        # Docker drops comment and blank lines even inside a continued instruction.
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, args = " ".join(parts).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    if parts:
        raise ValueError(f"instruction at line {start} ends with a line continuation")
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The build stages, each starting with its FROM."""
    result: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            result.append([])
        if not result:
            continue  # ARG before the first FROM
        result[-1].append(instruction)
    return result


def from_image(instruction: Instruction) -> tuple[str, str | None]:
    """(image, stage name) of a FROM."""
    words = [w for w in instruction.args.split() if not w.startswith("--")]
    name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
    return words[0], name


def exec_form(args: str) -> list[str] | None:
    """The argv of an exec-form (JSON array) instruction, or None for the shell form."""
    if not args.startswith("["):
        return None
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None  # Docker runs a malformed array through /bin/sh -c
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None


def env_pairs(args: str) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}  # legacy `ENV NAME value`
    return dict(word.split("=", 1) for word in words)


def healthcheck_command(args: str) -> list[str] | None:
    """The exec-form command of `HEALTHCHECK [options] CMD [...]`, else None."""
    options, cmd, command = args.partition("CMD ")
    if not cmd or any(not w.startswith("--") for w in options.split()):
        return None
    return exec_form(command.strip())


def shell_commands(script: str) -> list[list[str]]:
    """A RUN script split into its simple commands (at &&, ||, ; and |)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&"}:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


@dataclass(frozen=True)
class PipCommand:
    subcommand: str
    options: dict[str, str]  # option -> value ("" for a flag); -r files joined by spaces
    targets: list[str]


# pip options that take a value as the next word.
_PIP_VALUED = {
    "-r",
    "--requirement",
    "-c",
    "--constraint",
    "-w",
    "--wheel-dir",
    "--python",
    "-t",
    "--target",
    "--prefix",
    "--root",
    "--only-binary",
    "--no-binary",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
}


def pip_command(argv: list[str]) -> PipCommand | None:
    """Parse `pip ...`, `pip3 ...` or `python -m pip ...`; None for anything else."""
    if argv[:1] in (["pip"], ["pip3"]):
        words = argv[1:]
    elif len(argv) >= 3 and argv[0].startswith("python") and argv[1:3] == ["-m", "pip"]:
        words = argv[3:]
    else:
        return None
    subcommand = ""
    options: dict[str, str] = {}
    targets: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("-"):
            name, eq, value = word.partition("=")
            if not eq and name in _PIP_VALUED and i + 1 < len(words):
                value = words[i + 1]
                i += 1
            options[name] = f"{options[name]} {value}".strip() if name in options else value
        elif not subcommand:
            subcommand = word
        else:
            targets.append(word)
        i += 1
    return PipCommand(subcommand, options, targets)


def requirement_files(command: PipCommand) -> list[str]:
    return (command.options.get("-r", "") + " " + command.options.get("--requirement", "")).split()


def pip_problems(instructions: list[Instruction], copied: set[str]) -> list[str]:
    """Every pip install/wheel must be reproducible: from a hashed lock, or of local files only.

    `copied` holds the build-context paths the Dockerfile COPYs (a lock must be one of them).
    """
    problems: list[str] = []
    found = 0
    for instruction in instructions:
        if instruction.keyword != "RUN":
            continue
        for argv in shell_commands(instruction.args):
            command = pip_command(argv)
            if command is None or command.subcommand not in {"install", "wheel", "download"}:
                continue
            found += 1
            where = f"line {instruction.line}: pip {command.subcommand}"
            if "--no-deps" not in command.options:
                problems.append(f"{where} lacks --no-deps (would resolve unpinned dependencies)")
            files = requirement_files(command)
            if files:
                if "--require-hashes" not in command.options:
                    problems.append(f"{where} -r {' '.join(files)} lacks --require-hashes")
                for name in files:
                    if name not in copied:
                        problems.append(f"{where} reads {name}, which no COPY brings in")
            remote = [t for t in command.targets if not t.startswith(("/", "."))]
            if remote:
                problems.append(f"{where} names packages outside a hashed lock: {remote}")
            # Building the project's own wheel without isolation reaches no index either.
            builds_locally = (
                command.subcommand == "wheel" and "--no-build-isolation" in command.options
            )
            from_index = "--no-index" not in command.options and not builds_locally
            if command.targets and not files and from_index:
                problems.append(f"{where} of local files may reach an index: add --no-index")
    if not found:
        problems.append("no pip install in the Dockerfile")
    return problems


def copy_sources(instructions: list[Instruction]) -> set[str]:
    """Build-context paths COPYed (not those copied --from another stage)."""
    sources: set[str] = set()
    for instruction in instructions:
        if instruction.keyword not in {"COPY", "ADD"}:
            continue
        words = instruction.args.split()
        if any(w.startswith("--from") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        sources.update(p.rstrip("/") for p in paths[:-1])
    return sources


def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def entrypoint() -> list[str]:
    final = stages(dockerfile())[-1]
    entries = [i for i in final if i.keyword == "ENTRYPOINT"]
    assert len(entries) == 1, "the runtime stage needs exactly one ENTRYPOINT"
    argv = exec_form(entries[0].args)
    assert argv is not None, f"ENTRYPOINT must be an exec-form JSON array: {entries[0].args}"
    return argv


def served_port() -> int:
    """The port the image's ENTRYPOINT serves, read by the CLI's own parser."""
    from presence_svc.cli import parser

    argv = entrypoint()
    port: int = parser().parse_args(argv[1:]).port
    return port


def base_python_version() -> str:
    """The Python version of the base image, from its tag (python:3.11.17-slim-...)."""
    image, _ = from_image(stages(dockerfile())[-1][0])
    match = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image)
    assert match, f"runtime base {image} is not a python:X.Y.Z-slim image"
    return match.group(1)


# --- lock files -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str | None  # None unless pinned exactly with ==
    hashes: tuple[str, ...]
    line: str


def parse_lock(text: str) -> tuple[list[Pin], list[str]]:
    """(the pins, any option lines such as --index-url) of a pip requirements file."""
    logical: list[str] = []
    parts: list[str] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        logical.append(" ".join([*parts, stripped]))
        parts = []
    if parts:
        logical.append(" ".join(parts))
    pins: list[Pin] = []
    options: list[str] = []
    for line in logical:
        head, *rest = line.split()
        if head.startswith("-"):
            options.append(line)
            continue
        requirement = Requirement(head)
        specs = list(requirement.specifier)
        exact = len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version
        hashes = tuple(w.removeprefix("--hash=") for w in rest if w.startswith("--hash="))
        version = specs[0].version if exact else None
        pins.append(Pin(canonicalize_name(requirement.name), version, hashes, line))
    return pins, options


def lock_problems(text: str) -> list[str]:
    """Every line pinned exactly, each with sha256 hashes; no index or link options."""
    pins, options = parse_lock(text)
    problems = [f"option line (pins must not depend on an index): {o}" for o in options]
    for pin in pins:
        if pin.version is None:
            problems.append(f"{pin.name} is not pinned with ==: {pin.line}")
        if not pin.hashes or not all(h.startswith("sha256:") for h in pin.hashes):
            problems.append(f"{pin.name} has no sha256 hashes")
    names = [p.name for p in pins]
    problems += [f"{n} pinned twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if not pins:
        problems.append("no pins")
    return problems


def image_markers(python_full_version: str, machine: str) -> dict[str, str]:
    """PEP 508 marker values of the runtime image (CPython on Debian, glibc)."""
    major_minor = ".".join(python_full_version.split(".")[:2])
    return {
        "implementation_name": "cpython",
        "implementation_version": python_full_version,
        "os_name": "posix",
        "platform_machine": machine,
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": python_full_version,
        "python_version": major_minor,
        "sys_platform": "linux",
        "extra": "",
    }


def _applies(requirement: Requirement, env: Mapping[str, str], extras: Iterable[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**env, "extra": e}) for e in {"", *extras})


def runtime_closure(
    roots: Iterable[Requirement], env: Mapping[str, str]
) -> dict[str, list[Requirement]]:
    """Every distribution `roots` need on a machine with markers `env`, extras included.

    Walks the installed distributions' metadata (the dev venv installs every runtime
    dependency). Maps each canonical name to the requirements that pull it in.
    """
    needed: dict[str, list[Requirement]] = {}
    expanded: dict[str, set[str]] = {}
    queue = [r for r in roots if _applies(r, env, ())]
    while queue:
        requirement = queue.pop()
        name = canonicalize_name(requirement.name)
        needed.setdefault(name, []).append(requirement)
        extras = set(requirement.extras)
        if name in expanded and extras <= expanded[name]:
            continue
        expanded[name] = expanded.get(name, set()) | extras
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # reported by the caller: it is in `needed` but cannot be checked deeper
        for raw in requires:
            sub = Requirement(raw)
            if _applies(sub, env, expanded[name]):
                queue.append(sub)
    return needed


def closure_problems(lock_text: str, roots: list[Requirement], env: Mapping[str, str]) -> list[str]:
    pins = {p.name: p for p in parse_lock(lock_text)[0]}
    problems: list[str] = []
    for name, wanted_by in sorted(runtime_closure(roots, env).items()):
        pin = pins.get(name)
        if pin is None or pin.version is None:
            via = ", ".join(sorted({str(r) for r in wanted_by}))
            problems.append(f"{name} (needed: {via}) is not pinned in the lock")
            continue
        for requirement in wanted_by:
            if not requirement.specifier.contains(pin.version, prereleases=True):
                problems.append(f"{name}=={pin.version} does not satisfy {requirement}")
    return problems


def runtime_requirements() -> list[Requirement]:
    return [Requirement(r) for r in pyproject()["project"]["dependencies"]]


# --- nginx ----------------------------------------------------------------------------------


def nginx_directives(text: str) -> list[list[str]]:
    """Every directive as its words, `{`-blocks flattened, comments removed. Block openers come
    out as [name, args..., "{"] and closers as ["}"]."""
    text = re.sub(r"#[^\n]*", "", text)
    directives: list[list[str]] = []
    words: list[str] = []
    for token in re.findall(r"\"[^\"]*\"|'[^']*'|[{};]|[^\s{};]+", text):
        if token in {";", "{"}:
            directives.append([*words, "{"] if token == "{" else words)
            words = []
        elif token == "}":
            directives.append(["}"])
        else:
            words.append(token.strip("'\""))
    return directives


def nginx_block(text: str, *head: str) -> list[list[str]]:
    """The directives directly or indirectly inside the first block opened by `head`."""
    directives = nginx_directives(text)
    for i, words in enumerate(directives):
        if words[-1:] == ["{"] and tuple(words[:-1]) == head:
            depth = 1
            inner: list[list[str]] = []
            for item in directives[i + 1 :]:
                depth += item[-1:] == ["{"]
                depth -= item == ["}"]
                if depth == 0:
                    return inner
                inner.append(item)
    return []


def seconds(value: str) -> float:
    """An nginx or compose duration (`3600s`, `1h`, `20s`, `1m30s`, `90`) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    if value.isdigit():
        return float(value)
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", value):
        total += float(number) * units[unit]
    return total


# --- YAML (compose, Kubernetes) ------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
