-- A connection stops holding a session (its socket closed, or its node died). When no
-- connection holds the session any more, its user leaves at `leave_at` unless a heartbeat comes
-- first (a reconnect within the grace period, on any node).
-- KEYS[1] session hash   KEYS[2] session's connection set   KEYS[3] study's pending leaves
-- ARGV[1] user_id   ARGV[2] connection id   ARGV[3] leave_at ms
-- Returns 1 if a leave was scheduled (the caller then schedules a sweep for leave_at), else 0.

if redis.call('SREM', KEYS[2], ARGV[2]) == 0 then
  return 0
end
if redis.call('SCARD', KEYS[2]) > 0 or redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local leave_at = tonumber(ARGV[3])
local pending = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not pending or tonumber(pending) > leave_at then
  redis.call('ZADD', KEYS[3], leave_at, ARGV[1])
end
return 1
