"""Stats endpoints: `GET /stats` for operators (the dashboard's overview) and
`GET /presence/{study_id}/stats` for anyone the study is granted to.

`GET /stats` needs an operator's token: one that grants every study (`studies: "*"`) and
carries `presence:admin` in its `scope` claim; any other valid token gets 403. What each read
costs in Redis is in redis/stats.py.

Both answer 503 `unavailable` (`Retry-After: 1`), the JSON error of an unreachable Redis, when
Redis cannot serve the read or refuses it (a node ACL without a command the read needs): the
read changes nothing and the caller cannot fix it, and the dashboard polling it keeps going
and recovers once the ACL is fixed. Redis's words go to the node's log, not into the answer.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from presence_svc.auth import ADMIN_SCOPE
from presence_svc.web.errors import ApiError
from presence_svc.web.requests import authorize, node_of, principal, study_id

NOT_ADMIN = (
    f'an operator\'s token is needed: one granting every study ("*") with the {ADMIN_SCOPE} scope'
)


async def overview(request: Request) -> Response:
    if not principal(request).is_admin:
        raise ApiError(403, "forbidden", NOT_ADMIN)
    node = node_of(request)
    found = await node.stats.overview()
    return JSONResponse({"node_id": node.leases.node_id, **found.to_json()})


async def study(request: Request) -> Response:
    caller = principal(request)
    study = study_id(request)
    authorize(request, caller, study)
    found = await node_of(request).stats.study(study)
    return JSONResponse(found.to_json())


ROUTES = [
    Route("/stats", overview, methods=["GET"]),
    Route("/presence/{study_id}/stats", study, methods=["GET"]),
]
