-- A connection stops holding a session (its socket closed, or its node died). When no
-- connection holds the session any more, its user leaves at `leave_at` unless a heartbeat comes
-- first (a reconnect within the grace period, on any node).
-- KEYS[1] session hash   KEYS[2] session's connection set   KEYS[3] study's pending leaves
-- ARGV[1] user_id   ARGV[2] connection id   ARGV[3] leave_at ms
-- Returns 1 if a leave was scheduled (the caller then schedules a sweep for leave_at), else 0.
-- An earlier pending leave is kept: leave_at only ever moves a pending leave earlier.

local session_key, conns_key, leaving_key = KEYS[1], KEYS[2], KEYS[3]
local user_id, conn, leave_at = ARGV[1], ARGV[2], tonumber(ARGV[3])

if redis.call('SREM', conns_key, conn) == 0 then
  return 0
end
if redis.call('SCARD', conns_key) > 0 or redis.call('EXISTS', session_key) == 0 then
  return 0
end
local pending = redis.call('ZSCORE', leaving_key, user_id)
if not pending or tonumber(pending) > leave_at then
  redis.call('ZADD', leaving_key, leave_at, user_id)
end
return 1
