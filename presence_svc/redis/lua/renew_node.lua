-- A node's periodic proof of life; renews every lease its sockets hold in one call.
-- The renewal is stamped with Redis's own time when it runs, not the node's: a call that
-- waited behind a paused Redis (or a node with a wrong clock) must not look older than it is.
-- KEYS[1] live nodes   KEYS[2] claimed dead nodes
-- ARGV[1] node_id   ARGV[2] time to use instead of Redis's, in ms ('' for Redis's; tests)
-- Returns {known, now_ms}: known is 1 normally, 0 if the node had been declared dead (its
-- leases may have been released and must be taken again); now_ms the time it was renewed at.

local live_key, dead_key = KEYS[1], KEYS[2]
local node_id, now = ARGV[1], tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local known = redis.call('ZSCORE', live_key, node_id)
redis.call('ZADD', live_key, now, node_id)
redis.call('ZREM', dead_key, node_id)
if known then
  return {1, now}
end
return {0, now}
