"""The shapes of REST responses, for the OpenAPI document only.

The handlers render the domain dataclasses (`to_json`); these models only describe the result,
and tests/web/test_openapi.py checks that real responses validate against them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from presence_svc.models import Identifier, MovePath, Status

ISO_MS_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$"
HEX32_PATTERN = r"^[0-9a-f]{32}$"

IsoTime = Annotated[
    str,
    Field(pattern=ISO_MS_PATTERN, json_schema_extra={"format": "date-time"}),
]
Hex32 = Annotated[str, StringConstraints(pattern=HEX32_PATTERN)]
Count = Annotated[int, Field(ge=0)]


class _ResponseShape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SessionOut(_ResponseShape):
    """One user's presence in one study (`Session.to_json`)."""

    session_id: Hex32
    user_id: Identifier
    study_id: Identifier
    chapter_id: Identifier | None
    move_path: MovePath | None
    status: Status
    last_heartbeat: IsoTime
    joined_at: IsoTime


class CountsOut(_ResponseShape):
    """Every session of a study by status, read atomically with the seq (a snapshot's
    `counts`: active + idle + away = total)."""

    active: Count
    idle: Count
    away: Count


class PresenceOut(_ResponseShape):
    """A study's presence (`StudyPresence.to_json`): everyone, without parameters."""

    study_id: Identifier
    users: list[SessionOut]
    total: Count = Field(description="sessions in the study, listed or not")
    counts: CountsOut
    seq: Count = Field(description="the seq of the last event this listing includes")
    complete: bool = Field(description="true when `users` lists every session")


class PageOut(PresenceOut):
    """One page of a study's sessions in user_id order (`StudyPage.to_json`), with `limit`."""

    next: Identifier | None = Field(
        description="the user id to pass as `after` for the next page; null on the last page"
    )


class LeaveOut(_ResponseShape):
    """The answer to `DELETE /presence/{study_id}`, also when there was no session."""

    status: Literal["success"]


class Problem(_ResponseShape):
    """One validation problem: where, what, and its type."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorOut(_ResponseShape):
    """Every error: a code, and a message or (422) the list of problems."""

    error: str
    detail: str | list[Problem]


class HealthOut(_ResponseShape):
    """`GET /healthz`: the event loop answers; what the node holds right now."""

    status: Literal["ok"]
    node_id: Hex32
    sockets: Count
    studies: Count
    leases: Count
    slow_consumers: Count


class ReadinessOut(_ResponseShape):
    """`GET /readyz`: `ready` (200) only if every check passes, else `not ready` (503)."""

    status: Literal["ready", "not ready"]
    redis: Literal["ok", "unreachable"]
    pubsub: Literal["ok", "reconnecting"]
    draining: bool
    clock: Literal["ok", "skewed"]  # "skewed": off Redis's by more than PRESENCE_MAX_CLOCK_SKEW


Rate = Annotated[float, Field(ge=0)]


class StatusCountsOut(_ResponseShape):
    """Sessions by status, by heartbeat age against the thresholds (what the sweep applies
    within one sweep interval)."""

    active: Count
    idle: Count
    away: Count
    total: Count


class NodeStatsOut(_ResponseShape):
    """A live node: its last renewal, and its last report of itself (null: none yet)."""

    node_id: Hex32
    seen_ms_ago: Count = Field(description="since the node last renewed its liveness")
    sockets: Count | None
    watchers: Count | None = Field(description="of its sockets, those with no heartbeat yet")
    studies: Count | None = Field(description="study channels the node is subscribed to")
    leases: Count | None
    events_per_second: Rate | None = Field(description="events its scripts published")


class TopStudyOut(_ResponseShape):
    study_id: Identifier
    users: StatusCountsOut


class StatsOut(_ResponseShape):
    """`GET /stats`: every live node, and the studies with the most users (operators only)."""

    node_id: Hex32 = Field(description="the node that answered")
    nodes: list[NodeStatsOut]
    sockets: Count = Field(description="open WebSockets, summed over the nodes' reports")
    watchers: Count = Field(
        description="of those, the ones that only watch (no heartbeat yet), summed likewise"
    )
    events_per_second: Rate = Field(description="events published, summed over the nodes")
    studies: Count = Field(description="studies with sessions")
    sampled: Count = Field(description="studies counted (a bounded sample when there are more)")
    exact: bool = Field(description="true when every study was counted")
    sessions: StatusCountsOut = Field(description="sessions of the counted studies")
    top_studies: list[TopStudyOut] = Field(description="most users first")


class StudyStatsOut(_ResponseShape):
    """`GET /presence/{study_id}/stats`: users by status and the sockets watching the study."""

    study_id: Identifier
    users: StatusCountsOut
    watching: Count = Field(description="WebSockets of every live node subscribed to the study")
    watchers: Count = Field(description="of those, the ones that only watch (no heartbeat yet)")
    seq: Count = Field(description="the seq of the study's last event")
