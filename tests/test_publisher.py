"""The Python publisher for other backends' study events."""

from __future__ import annotations

from typing import Any

import fakeredis
import msgpack
import pytest

from presence_svc.codec import decode_envelope
from presence_svc.publisher import (
    AsyncStudyEventPublisher,
    StudyEventPublisher,
    study_event,
    study_signal,
)
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


# --- signals ----------------------------------------------------------------------------------


def test_sync_publish_signal_sends_a_signal_envelope_from_the_user() -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    pubsub = client.pubsub()
    pubsub.subscribe(Keys("p").channel("s1"))
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    publisher = StudyEventPublisher(client, key_prefix="p")
    assert publisher.publish_signal("s1", "typing", "bot", {"user_id": "x", "chapter_id": "c"}) == 1
    envelope = msgpack.unpackb(pubsub.get_message(timeout=1)["data"])
    assert envelope["type"] == "signal.typing"
    assert envelope["data"] == {"user_id": "bot", "chapter_id": "c"}
    assert isinstance(envelope["ts"], int)
    assert "from" not in envelope  # a backend's: every socket of the study gets it
    pubsub.close()
    client.close()


async def test_async_publish_signal_is_relayed_without_seq_to_every_socket(
    fake_redis: Any,
) -> None:
    pubsub = fake_redis.pubsub()
    await pubsub.subscribe(Keys("presence").channel("s1"))
    await pubsub.get_message(timeout=1)
    await AsyncStudyEventPublisher(fake_redis).publish_signal("s1", "pointer", "bot")
    outgoing = decode_envelope((await pubsub.get_message(timeout=1))["data"])
    assert outgoing.text == '{"type":"signal.pointer","data":{"user_id":"bot"}}'
    assert (outgoing.seq, outgoing.personal, outgoing.key) == (
        None,
        None,
        ("signal.pointer", "bot"),
    )
    await pubsub.aclose()


@pytest.mark.parametrize(
    ("study_id", "name", "user_id", "data", "error"),
    [
        ("bad study", "typing", "bot", {}, ValueError),
        ("s1", "Typing", "bot", {}, ValueError),
        ("s1", "", "bot", {}, ValueError),
        ("s1", "a" * 33, "bot", {}, ValueError),
        ("s1", "typing", "bad user", {}, ValueError),
        ("s1", "typing", "bot", {"t": "x" * 1017}, ValueError),  # 1025 bytes as compact JSON
        ("s1", "typing", "bot", {"t": "é" * 509}, ValueError),  # bytes, not characters
        ("s1", "typing", "bot", {"n": float("nan")}, ValueError),
        ("s1", "typing", "bot", {"n": [2**64]}, ValueError),
        ("s1", "typing", "bot", ["not", "a", "dict"], TypeError),
        ("s1", "typing", "bot", {"n": {1, 2}}, TypeError),
    ],
)
def test_publish_signal_refuses_what_a_node_would_refuse_from_a_socket(
    study_id: str, name: str, user_id: str, data: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        study_signal(study_id, name, user_id, data)


def test_a_signal_at_the_size_limit_is_accepted_and_the_limit_is_the_nodes() -> None:
    at_limit = {"t": "x" * 1016}  # exactly 1024 bytes as compact JSON
    assert msgpack.unpackb(study_signal("s1", "typing", "bot", at_limit))["data"]["t"]
    with pytest.raises(ValueError, match="over 64"):
        study_signal("s1", "typing", "bot", {"t": "x" * 57}, max_bytes=64)
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    publisher = StudyEventPublisher(client, signal_max_bytes=4096)
    assert publisher.publish_signal("s1", "typing", "bot", {"t": "x" * 4000}) == 0
    client.close()


def test_nested_non_string_keys_reach_sockets_as_json_would_carry_them() -> None:
    # msgpack would keep the integer key and every node would drop the envelope.
    relayed = decode_envelope(study_signal("s1", "pointer", "bot", {"m": {1: "e4"}}))
    assert relayed.text == '{"type":"signal.pointer","data":{"m":{"1":"e4"},"user_id":"bot"}}'
