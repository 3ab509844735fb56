"""The query of `GET /presence/{study_id}`: which page it asks for, parsed strictly.

- Neither `limit` nor `after`: everyone (the listing as it always was, `complete` true).
- `limit`, an integer 1..MAX_LIMIT in decimal digits (no sign, space, point or exponent): the
  first page in user_id order; with `after`, a user id, the page after it (exclusive).
- `after` without `limit`: a page of DEFAULT_LIMIT sessions. A client that follows `next` asks
  for the size it wants; one that forgets it still gets a bounded answer.
- Each at most once. Other parameters are ignored, as they always were.

Anything else is a 422 `validation_error` listing every problem as `{loc, msg, type}`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import QueryParams

from presence_svc.models import ID_PATTERN
from presence_svc.web.errors import ApiError

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100

_DIGITS = re.compile(r"[0-9]+")
_ID = re.compile(ID_PATTERN)


@dataclass(frozen=True, slots=True)
class PageRequest:
    """One page: at most `limit` sessions after the user id `after` (None: from the first)."""

    limit: int
    after: str | None = None


def page_request(query: QueryParams) -> PageRequest | None:
    """The page `query` asks for, or None for everyone; ApiError 422 if it is not valid."""
    limits, afters = query.getlist("limit"), query.getlist("after")
    problems: list[dict[str, Any]] = []
    for name, values in (("limit", limits), ("after", afters)):
        if len(values) > 1:
            problems.append(_problem(name, "must be given at most once", "repeated"))
    limit: int | None = None
    if len(limits) == 1:
        limit = _limit(limits[0], problems)
    after = afters[0] if len(afters) == 1 else None
    if after is not None and not _ID.fullmatch(after):
        problems.append(_problem("after", f"must match {ID_PATTERN}", "pattern"))
    if problems:
        raise ApiError(422, "validation_error", problems)
    if limit is None and after is None:
        return None
    return PageRequest(DEFAULT_LIMIT if limit is None else limit, after)


def _limit(value: str, problems: list[dict[str, Any]]) -> int | None:
    if not _DIGITS.fullmatch(value):
        message = f"must be an integer from 1 to {MAX_LIMIT}, in decimal digits"
        problems.append(_problem("limit", message, "int_parsing"))
        return None
    # Not int() of thousands of digits (Python refuses past 4300): too large is too large.
    digits = value.lstrip("0")
    number = int(digits or "0") if len(digits) <= len(str(MAX_LIMIT)) else MAX_LIMIT + 1
    if number < 1:
        problems.append(_problem("limit", "must be at least 1", "greater_than_equal"))
        return None
    if number > MAX_LIMIT:
        problems.append(_problem("limit", f"must be at most {MAX_LIMIT}", "less_than_equal"))
        return None
    return number


def _problem(name: str, message: str, kind: str) -> dict[str, Any]:
    return {"loc": ["query", name], "msg": message, "type": kind}
