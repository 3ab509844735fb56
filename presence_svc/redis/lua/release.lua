-- A connection stops holding a session (its socket closed, or its node died). When no
-- connection holds the session any more, its user leaves at `leave_at` unless a heartbeat comes
-- first (a reconnect within the grace period, on any node).
-- The released id is also kept, scored by `leave_at`, so that a heartbeat or an acquire under
-- it reaching Redis later (delayed by a stall) cannot hold the session again: kept for
-- `keep_ms` past its leave time, the newest `max_kept` per session (the set expires with them).
-- A connection released again (the lease-set pass may release a lease its socket has just
-- released) keeps the leave time of its first release, and the set keeps its expiry.
-- KEYS[1] session hash   KEYS[2] session's connection set   KEYS[3] study's pending leaves
-- KEYS[4] session's released connection ids
-- ARGV[1] user_id   ARGV[2] connection id   ARGV[3] leave_at ms   ARGV[4] now ms
-- ARGV[5] keep_ms   ARGV[6] max_kept
-- Returns 1 if a leave was scheduled (the caller then schedules a sweep for leave_at), else 0.
-- An earlier pending leave is kept: leave_at only ever moves a pending leave earlier.

local session_key, conns_key, leaving_key, released_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local user_id, conn, leave_at = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now, keep_ms, max_kept = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])

-- Whatever the connection set holds: this release may have overtaken the connection's first
-- heartbeat, which must then find the id released. NX: the first release's leave time stands,
-- and a repeated release neither moves it nor keeps the set longer (nothing was added).
if redis.call('ZADD', released_key, 'NX', leave_at, conn) == 1 then
  redis.call('ZREMRANGEBYSCORE', released_key, '-inf', now - keep_ms)
  redis.call('ZREMRANGEBYRANK', released_key, 0, -(max_kept + 1))
  redis.call('PEXPIRE', released_key, math.max(leave_at - now, 0) + keep_ms)
end

if redis.call('SREM', conns_key, conn) == 0 then
  return 0
end
if redis.call('SCARD', conns_key) > 0 or redis.call('EXISTS', session_key) == 0 then
  return 0
end
leave_by(leaving_key, user_id, leave_at)
return 1
