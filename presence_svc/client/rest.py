"""The one REST call the client makes: `DELETE /presence/{study_id}` (the socket has no leave).

The standard library's HTTP client, in a worker thread: one call per leave does not justify
an HTTP client dependency.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Sequence

from presence_svc.client.feed import PresenceError

UNAUTHORIZED = 401


class Refused(PresenceError):
    """The node refused the call (4xx): another node would refuse it too."""


class Unauthorized(Refused):
    """The node refused the token (401)."""


async def delete_presence(urls: Sequence[str], token: str, per_call: float) -> None:
    """End the user's session: try each URL in turn (`per_call` seconds each) until one
    node answers.

    Unauthorized on a 401 (the caller may retry with a fresh token), Refused on another 4xx,
    PresenceError when no node answers.
    """
    failures: list[str] = []
    for url in urls:
        try:
            await asyncio.to_thread(_delete, url, token, per_call)
        except Refused:
            raise
        except PresenceError as exc:
            failures.append(str(exc))
        else:
            return
    raise PresenceError("leave failed on every node: " + "; ".join(failures))


def _delete(url: str, token: str, timeout: float) -> None:
    request = urllib.request.Request(
        url, method="DELETE", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            json.load(response)
    except urllib.error.HTTPError as exc:
        with exc:
            detail = exc.read(512).decode(errors="replace")
        if exc.code == UNAUTHORIZED:
            raise Unauthorized(f"{url}: 401 {detail}", UNAUTHORIZED) from None
        if exc.code < 500:
            raise Refused(f"{url}: {exc.code} {detail}", exc.code) from None
        raise PresenceError(f"{url}: {exc.code} {detail}", exc.code) from None
    except (OSError, ValueError) as exc:
        raise PresenceError(f"{url}: {exc}") from None
