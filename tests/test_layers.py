"""The layering rules of docs/architecture.md, checked on the imports of the package's modules.

- The domain (service, store, fanout, batching, leases, sweeper, models, codec, coalesce) imports
  neither Starlette nor redis-py nor presence_svc.redis: it is written against the Protocols of
  store.py and fanout.py, and app.build_node hands it the Redis side.
- presence_svc/redis/ knows nothing of HTTP or WebSockets: no Starlette, nothing of
  presence_svc.web.
- presence_svc/web/ imports nothing of presence_svc.redis (the node it gets carries the
  Redis side behind the domain's contracts) and, but for the exceptions in WEB_USES_REDIS_PY,
  no redis-py.

Every import counts, wherever it is (inside a function or under TYPE_CHECKING too): a lazy
import still ties the layers together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "presence_svc"
DOMAIN = (
    "service",
    "store",
    "fanout",
    "batching",
    "leases",
    "sweeper",
    "models",
    "codec",
    "coalesce",
)
# web/ modules allowed to import redis-py, and why. None may import presence_svc.redis.
WEB_USES_REDIS_PY = {
    # `make demo`'s launcher, not a part of the served node: it only pings the local Redis
    # to choose between it and the embedded store, and deletes the demo's keys at exit.
    "demo_launch.py": "pings and cleans the local Redis for `make demo`",
}


def imported(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Every module `path` (under `root`) imports, by absolute name (`from a import b` counts
    both a and a.b: b may be a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(path.relative_to(root), node.module, node.level)
            names.add(base)
            # `from presence_svc import redis` imports the subpackage: count it as such.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _absolute(relative: Path, module: str | None, level: int) -> str:
    if not level:
        return module or ""
    parts = list(relative.with_suffix("").parts)[:-level]
    return ".".join([*parts, *([module] if module else [])])


def within(names: set[str], *roots: str) -> list[str]:
    """The names that are one of `roots` or inside one."""
    return sorted(n for n in names if any(n == r or n.startswith(r + ".") for r in roots))


def modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize("name", DOMAIN)
def test_the_domain_imports_neither_starlette_nor_redis(name: str) -> None:
    path = PACKAGE / f"{name}.py"
    assert path.is_file(), f"{path} moved: update DOMAIN (and docs/architecture.md)"
    assert within(imported(path), "starlette", "redis", "presence_svc.redis") == []


def test_the_redis_layer_knows_nothing_of_http() -> None:
    found = {
        str(path.relative_to(PACKAGE)): bad
        for path in modules(PACKAGE / "redis")
        if (bad := within(imported(path), "starlette", "presence_svc.web"))
    }
    assert found == {}


def test_the_web_layer_imports_nothing_of_presence_svc_redis() -> None:
    found = {
        str(path.relative_to(PACKAGE)): bad
        for path in modules(PACKAGE / "web")
        if (bad := within(imported(path), "presence_svc.redis"))
    }
    assert found == {}


def test_the_web_layer_uses_redis_py_only_where_listed() -> None:
    users = {
        str(path.relative_to(PACKAGE / "web"))
        for path in modules(PACKAGE / "web")
        if within(imported(path), "redis")
    }
    assert users == set(WEB_USES_REDIS_PY)


def test_the_check_sees_every_form_of_import(tmp_path: Path) -> None:
    """The checks above would pass vacuously if `imported` missed a form of import."""
    folder = tmp_path / "presence_svc" / "web"
    folder.mkdir(parents=True)
    path = folder / "probe.py"
    path.write_text(
        "import redis.asyncio as aioredis\n"
        "from presence_svc import redis\n"
        "def later() -> None:\n"
        "    from starlette.requests import Request\n"
        "    from ..redis.keys import Keys\n"
    )
    names = imported(path, tmp_path)
    assert within(names, "redis") == ["redis.asyncio"]
    assert within(names, "presence_svc.redis") == [
        "presence_svc.redis",
        "presence_svc.redis.keys",
        "presence_svc.redis.keys.Keys",
    ]
    assert within(names, "starlette") == ["starlette.requests", "starlette.requests.Request"]
