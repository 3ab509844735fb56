"""What every REST endpoint takes from its request: the node serving it, the caller (401), the
study of the path (422) and the caller's grant to it (403). Shared by web/rest.py and
web/stats.py, so that each check is written, and answers, the same way everywhere.
"""

from __future__ import annotations

import re

from starlette.requests import Request

from presence_svc.auth import AuthError, Principal, bearer
from presence_svc.models import ID_PATTERN
from presence_svc.node import Node
from presence_svc.web.errors import ApiError

_STUDY_ID = re.compile(ID_PATTERN)


def node_of(request: Request) -> Node:
    """The node the app runs (set at start-up)."""
    node: Node = request.app.state.node
    return node


def principal(request: Request) -> Principal:
    """Who the request's bearer token says the caller is; ApiError 401 if it does not."""
    return caller_of(node_of(request), request.headers.get("authorization"))


def caller_of(node: Node, authorization: str | None) -> Principal:
    """`principal` from the Authorization header's value (for endpoints without a Request)."""
    try:
        return node.verifier.principal(bearer(authorization))
    except AuthError as exc:
        raise ApiError(401, "unauthorized", str(exc), {"WWW-Authenticate": "Bearer"}) from None


def authorize(request: Request, caller: Principal, study_id: str) -> None:
    """ApiError 403 unless `caller` may access `study_id` (when the node requires grants)."""
    check_grant(node_of(request), caller, study_id)


def check_grant(node: Node, caller: Principal, study_id: str) -> None:
    """`authorize` on the node itself (for endpoints without a Request)."""
    if node.settings.study_grant_required and not caller.may_access(study_id):
        raise ApiError(403, "forbidden", f"the token grants no access to study {study_id!r}")


def study_id(request: Request) -> str:
    """The path's `study_id`; ApiError 422 if it is not a valid id."""
    found: str = request.path_params["study_id"]
    if not _STUDY_ID.fullmatch(found):
        raise ApiError(
            422,
            "validation_error",
            [{"loc": ["path", "study_id"], "msg": f"must match {ID_PATTERN}", "type": "pattern"}],
        )
    return found
