"""Token buckets."""

from __future__ import annotations

import pytest

from presence_svc.limits import KeyedBuckets, TokenBucket


def test_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.05) == pytest.approx(0.05)
    assert bucket.take(0.1) == 0.0
    assert bucket.take(100.0) == 0.0  # refilled, but never beyond the burst
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]


def test_keys_have_their_own_buckets_and_are_bounded() -> None:
    buckets = KeyedBuckets(rate=1, burst=1, max_keys=2)
    assert buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) > 0
    assert buckets.take("b", 0.0) == 0.0
    assert buckets.take("c", 0.0) == 0.0  # "a" is forgotten: the oldest
    assert buckets.take("b", 0.0) > 0
    assert buckets.take("a", 0.0) == 0.0
