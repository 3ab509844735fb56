"""Stats endpoints: `GET /stats` for operators (the dashboard's overview) and
`GET /presence/{study_id}/stats` for anyone the study is granted to.

`GET /stats` needs an operator's token: one that grants every study (`studies: "*"`) and
carries `presence:admin` in its `scope` claim; any other valid token gets 403. What each read
costs in Redis is in redis/stats.py.
"""

from __future__ import annotations

import math

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from presence_svc.auth import ADMIN_SCOPE
from presence_svc.web.errors import ApiError
from presence_svc.web.rest import _authorize, _node, _principal, _study_id

NOT_ADMIN = (
    f'an operator\'s token is needed: one granting every study ("*") with the {ADMIN_SCOPE} scope'
)


def _now_ms(request: Request) -> int:
    # The node's clock (Redis's): the one node renewals and heartbeats are stamped with.
    return math.floor(_node(request).clock.time() * 1000)


async def overview(request: Request) -> Response:
    principal = _principal(request)
    if not principal.is_admin:
        raise ApiError(403, "forbidden", NOT_ADMIN)
    node = _node(request)
    lease_ttl_ms = round(node.settings.lease_ttl * 1000)
    found = await node.stats.overview(_now_ms(request), lease_ttl_ms)
    return JSONResponse({"node_id": node.leases.node_id, **found.to_json()})


async def study(request: Request) -> Response:
    principal = _principal(request)
    study_id = _study_id(request)
    _authorize(request, principal, study_id)
    node = _node(request)
    lease_ttl_ms = round(node.settings.lease_ttl * 1000)
    found = await node.stats.study(study_id, _now_ms(request), lease_ttl_ms)
    return JSONResponse(found.to_json())


ROUTES = [
    Route("/stats", overview, methods=["GET"]),
    Route("/presence/{study_id}/stats", study, methods=["GET"]),
]
