"""The nodes a client may use: base URLs, the socket and REST URLs built from them, rotation."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import quote, urlsplit, urlunsplit

_SOCKET_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
_REST_SCHEMES = {"ws": "http", "wss": "https", "http": "http", "https": "https"}
SOCKET_PATH = "/ws/presence"


class Endpoints:
    """Base URLs of nodes (http, https, ws or wss), tried in turn.

    One URL behind a load balancer is the usual case; a list lets a client move to another
    node by itself when the one it uses fails.
    """

    def __init__(self, urls: str | Sequence[str]) -> None:
        given = [urls] if isinstance(urls, str) else list(urls)
        if not given:
            raise ValueError("PresenceClient needs at least one URL")
        self._bases = [_base(url) for url in given]
        self._current = 0

    def __len__(self) -> int:
        return len(self._bases)

    def rotate(self) -> None:
        """Move on to the next URL (the same one again if there is only one)."""
        self._current = (self._current + 1) % len(self._bases)

    def socket_url(self, study_id: str) -> str:
        scheme, rest = self._bases[self._current]
        return f"{_SOCKET_SCHEMES[scheme]}://{rest}{SOCKET_PATH}?study_id={quote(study_id)}"

    def rest_urls(self, path: str) -> list[str]:
        """`path` on every node, the current one first."""
        order = self._bases[self._current :] + self._bases[: self._current]
        return [f"{_REST_SCHEMES[scheme]}://{rest}{path}" for scheme, rest in order]


def _base(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme not in _SOCKET_SCHEMES or not parts.netloc:
        raise ValueError(f"not an http(s) or ws(s) base URL: {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"a base URL takes no query or fragment: {url!r}")
    path = parts.path.rstrip("/")
    return parts.scheme, urlunsplit(("", parts.netloc, path, "", "")).removeprefix("//")
