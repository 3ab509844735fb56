-- Claims the nodes whose liveness entry is older than the lease TTL, for this caller to release
-- their leases; also re-claims cleanups that were claimed long ago and never finished (the
-- claimer died too). Each node is claimed by one caller at a time.
-- KEYS[1] live nodes (node_id -> last renewal ms)   KEYS[2] claimed dead nodes (-> claim ms)
-- ARGV[1] now_ms   ARGV[2] lease TTL ms   ARGV[3] stale claim ms   ARGV[4] limit
-- Returns {node1, last_seen1, node2, last_seen2, ...}.

local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl, 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[4]))
for i = 1, #dead, 2 do
  redis.call('ZREM', KEYS[1], dead[i])
  redis.call('ZADD', KEYS[2], now, dead[i])
  out[#out + 1] = dead[i]
  out[#out + 1] = dead[i + 1]
end
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]), 'LIMIT', 0,
  tonumber(ARGV[4]))
for i = 1, #stale do
  redis.call('ZADD', KEYS[2], now, stale[i])
  out[#out + 1] = stale[i]
  out[#out + 1] = tostring(now - ttl)
end
return out
