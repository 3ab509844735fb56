"""Presence bound to WebSocket connections: holds, releases, node liveness and reaping.

One module per topic: the store's lease scripts (test_store_holds, test_store_releases,
test_store_nodes), the keeper's renewals and reaps (test_keeper), its releases and retries
(test_keeper_releases), its periodic pass over its lease set (test_keeper_pass), and clocks
(test_clocks). What they share is in tests/support/leases.py; conftest.py has the `node`
fixture.

The store-level tests run on fakeredis and on a real Redis (`any_redis`) with explicit times and
check exactly which events were published (EventTap, from tests/support/events.py: it
pattern-subscribes to the test's prefix and reads up to a marker it publishes itself, so
"nothing was published" needs no timeout, and it asserts seq continuity on every channel).
The LeaseKeeper tests drive a real PresenceService over RedisStore on fakeredis, the keeper on a
ManualTimer: each `advance(TICK)` runs exactly one of its ticks, with no real time to wait.
"""
