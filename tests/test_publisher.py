"""The Python publisher for other backends' study events."""

from __future__ import annotations

from typing import Any

import fakeredis
import msgpack
import pytest

from presence_svc.codec import decode_envelope
from presence_svc.publisher import AsyncStudyEventPublisher, StudyEventPublisher, study_event
from presence_svc.redis.keys import Keys


def test_sync_publisher_puts_an_envelope_on_the_study_channel() -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    pubsub = client.pubsub()
    pubsub.subscribe(Keys("p").channel("s1"))
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    receivers = StudyEventPublisher(client, key_prefix="p").publish("s1", "study.note", {"n": 1})
    message = pubsub.get_message(timeout=1)
    assert receivers == 1
    envelope = msgpack.unpackb(message["data"])
    assert envelope["type"] == "study.note"
    assert envelope["data"] == {"n": 1}
    assert isinstance(envelope["ts"], int)
    pubsub.close()
    client.close()


async def test_async_publisher_is_relayed_as_json_without_seq(fake_redis: Any) -> None:
    pubsub = fake_redis.pubsub()
    await pubsub.subscribe(Keys("presence").channel("s1"))
    await pubsub.get_message(timeout=1)
    await AsyncStudyEventPublisher(fake_redis).publish("s1", "chat.message", {"seq": 5, "t": "hi"})
    message = await pubsub.get_message(timeout=1)
    outgoing = decode_envelope(message["data"])
    assert outgoing.seq is None
    assert outgoing.text == '{"type":"chat.message","data":{"seq":5,"t":"hi"}}'
    await pubsub.aclose()


@pytest.mark.parametrize(
    ("study_id", "event_type", "error"),
    [
        ("s1", "presence.user_joined", ValueError),
        ("s1", "", ValueError),
        ("bad study", "study.note", ValueError),
        ("s{1}", "study.note", ValueError),
    ],
)
def test_refuses_what_nodes_would_not_relay(
    study_id: str, event_type: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        study_event(study_id, event_type, {})
