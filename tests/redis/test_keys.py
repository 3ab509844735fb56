"""Key and channel names: one hash tag per study, schedule shards by CRC-32."""

from __future__ import annotations

import zlib
from collections import Counter

import pytest
from redis.crc import key_slot

from presence_svc.redis.keys import SCHEDULE_SHARDS, Keys, StudyKeys


def test_study_keys_layout() -> None:
    sk = Keys("presence").study("study123")
    assert sk == StudyKeys(
        index="presence:{study123}:index",
        meta="presence:{study123}:meta",
        channel="presence:{study123}:events",
        leaving="presence:{study123}:leaving",
        session_prefix="presence:{study123}:session:",
        conns_prefix="presence:{study123}:conns:",
        released_prefix="presence:{study123}:released:",
    )
    assert sk.session("alice") == "presence:{study123}:session:alice"
    assert sk.conns("alice") == "presence:{study123}:conns:alice"
    assert sk.released("alice") == "presence:{study123}:released:alice"
    assert sk.of_hold("alice") == [
        "presence:{study123}:session:alice",
        "presence:{study123}:conns:alice",
        "presence:{study123}:leaving",
        "presence:{study123}:released:alice",
    ]
    assert sk.session("bob@x.org") == "presence:{study123}:session:bob@x.org"


def test_channel_matches_study_keys() -> None:
    keys = Keys("p")
    for study in ("s", "study:1", "a.b-c_d@e"):
        assert keys.channel(study) == keys.study(study).channel


@pytest.mark.parametrize("study", ["s", "study123", "study:1", "a.b-c_d@e", "X" * 128])
def test_all_keys_of_a_study_are_in_one_cluster_slot(study: str) -> None:
    sk = Keys("presence").study(study)
    names = [
        sk.index,
        sk.meta,
        sk.channel,
        sk.leaving,
        sk.session("alice"),
        sk.session("u:1"),
        sk.conns("alice"),
        sk.released("alice"),
    ]
    slots = {key_slot(name.encode()) for name in names}
    assert slots == {key_slot(study.encode())}


def test_different_studies_are_spread_over_slots() -> None:
    keys = Keys("presence")
    slots = {key_slot(keys.study(f"s{i}").index.encode()) for i in range(200)}
    assert len(slots) > 150


def test_schedule_shards() -> None:
    keys = Keys("presence")
    shards = keys.schedule_shards()
    assert SCHEDULE_SHARDS == 16
    assert shards == [f"presence:{{schedule:{n}}}:due" for n in range(16)]
    assert len({key_slot(s.encode()) for s in shards}) > 1  # not all on one slot


@pytest.mark.parametrize("study", ["study123", "s", "é-study", "a:b"])
def test_schedule_shard_is_crc32_of_study_id(study: str) -> None:
    keys = Keys("presence")
    expected = zlib.crc32(study.encode()) % 16
    assert keys.schedule(study) == f"presence:{{schedule:{expected}}}:due"
    assert keys.schedule(study) in keys.schedule_shards()


def test_schedule_shard_is_stable_for_known_ids() -> None:
    # Part of the storage format: a change here moves studies between shards.
    keys = Keys("p")
    shard = zlib.crc32(b"study123") % 16
    assert keys.schedule("study123") == f"p:{{schedule:{shard}}}:due"
    # Known values, so a different hash or shard count cannot slip in unnoticed.
    assert [zlib.crc32(s.encode()) % 16 for s in ("a", "b", "c", "study123")] == [3, 9, 15, 11]
    assert [keys.schedule(s) for s in ("a", "b", "c")] == [
        "p:{schedule:3}:due",
        "p:{schedule:9}:due",
        "p:{schedule:15}:due",
    ]


def test_studies_use_every_shard() -> None:
    keys = Keys("presence")
    counts = Counter(keys.schedule(f"study-{i}") for i in range(1600))
    assert set(counts) == set(keys.schedule_shards())
    assert max(counts.values()) < 3 * min(counts.values())


def test_prefix_separates_deployments() -> None:
    a, b = Keys("a"), Keys("b")
    assert a.study("s").index != b.study("s").index
    assert a.channel("s") != b.channel("s")
    assert set(a.schedule_shards()).isdisjoint(b.schedule_shards())


def test_keys_are_immutable() -> None:
    keys = Keys("p")
    with pytest.raises(AttributeError):
        keys.prefix = "q"  # type: ignore[misc]
