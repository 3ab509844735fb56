-- Claims the nodes whose liveness entry is older than the lease TTL, for this caller to release
-- their leases; also re-claims cleanups that were claimed long ago and never finished (the
-- claimer died too). Each node is claimed by one caller at a time.
-- KEYS[1] live nodes (node_id -> last renewal ms)   KEYS[2] claimed dead nodes (-> claim ms)
-- ARGV[1] now_ms   ARGV[2] lease TTL ms   ARGV[3] stale claim ms   ARGV[4] limit (per kind)
-- Returns {node1, last_seen1, node2, last_seen2, ...}: up to `limit` newly dead nodes with their
-- last renewal ms, then up to `limit` re-claimed ones with now_ms - lease TTL as last_seen.

local live_key, dead_key = KEYS[1], KEYS[2]
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local stale_ms, limit = tonumber(ARGV[3]), tonumber(ARGV[4])

local out = {}
local dead = redis.call('ZRANGEBYSCORE', live_key, '-inf', now - ttl, 'WITHSCORES', 'LIMIT', 0,
  limit)
for i = 1, #dead, 2 do
  redis.call('ZREM', live_key, dead[i])
  redis.call('ZADD', dead_key, now, dead[i])
  out[#out + 1] = dead[i]
  out[#out + 1] = dead[i + 1]
end
local stale = redis.call('ZRANGEBYSCORE', dead_key, '-inf', now - stale_ms, 'LIMIT', 0, limit)
for i = 1, #stale do
  redis.call('ZADD', dead_key, now, stale[i])
  out[#out + 1] = stale[i]
  out[#out + 1] = tostring(now - ttl)
end
return out
