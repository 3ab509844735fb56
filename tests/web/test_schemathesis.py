"""Schemathesis fuzzes the REST API, in process (ASGI, fakeredis), against its own OpenAPI document.

Every call carries a valid token for every study; schemathesis still tries calls without it
(`ignored_auth`) and methods the document does not list (`unsupported_method`). Each response
must be documented: no 5xx, a documented status code, content type, headers and body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import settings

from presence_svc.app import create_app
from presence_svc.auth import ALL_STUDIES
from presence_svc.web import openapi
from tests.support.app import fake_redis, make_settings
from tests.support.auth import token

MAX_EXAMPLES = 30


def _config() -> schemathesis.Config:
    fuzzer = token("fuzzer", studies=ALL_STUDIES)
    return schemathesis.Config.from_dict(
        {
            "auth": {"openapi": {openapi.SECURITY_SCHEME: {"bearer": fuzzer}}},
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "database": "none",
                # Negative cases break the path or the body, not the token (else nearly all of
                # them stop at 401). The `ignored_auth` check still sends each call without it.
                "with-security-parameters": False,
            },
        }
    )


REDIS = fake_redis()
APP = create_app(
    make_settings(
        # Grants are checked (the token grants every study), and the heartbeat rate limit is
        # high enough that the fuzzer's heartbeats reach the store rather than a 429.
        require_study_grant=True,
        rest_heartbeat_rate=10_000,
        rest_heartbeat_burst=10_000,
    ),
    redis=REDIS,
)

# The document the app serves (tests/test_openapi.py checks that it serves this one). The app is
# called in process; schemathesis starts its lifespan on the first call of a test and its pytest
# plugin ends it after each test. (Not `schemathesis.pytest.from_fixture`: in schemathesis 4.32
# it reads `request.node._nodeid`, which pytest 9 no longer has.)
schema = schemathesis.openapi.from_dict(openapi.document(), config=_config())
schema.app = APP


@pytest.fixture(scope="module", autouse=True)
def _close_redis() -> Iterator[None]:
    yield
    asyncio.run(REDIS.aclose())


@schema.parametrize()
# No example database: nothing is written under .hypothesis/ for these tests.
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
def test_api_conforms_to_its_document(case: schemathesis.Case) -> None:
    case.call_and_validate()
