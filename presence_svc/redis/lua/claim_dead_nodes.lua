-- Claims the nodes whose liveness entry is older than the lease TTL, for this caller to release
-- their leases; also re-claims cleanups that were claimed long ago and never finished (the
-- claimer died too). Each node is claimed by one caller at a time, and never the caller itself.
-- Ages are measured on Redis's clock, as renewals are stamped (renew_node.lua).
-- KEYS[1] live nodes (node_id -> last renewal ms)   KEYS[2] claimed dead nodes (-> claim ms)
-- ARGV[1] time to use instead of Redis's, in ms ('' for Redis's; tests)   ARGV[2] lease TTL ms
-- ARGV[3] stale claim ms   ARGV[4] limit (per kind)   ARGV[5] the caller's node id
-- Returns {now_ms, node1, last_seen1, node2, last_seen2, ...}: the time of the claim, then up
-- to `limit` newly dead nodes with their last renewal ms, then up to `limit` re-claimed ones
-- with now_ms - lease TTL as last_seen.

local live_key, dead_key = KEYS[1], KEYS[2]
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local stale_ms, limit, caller = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local out = {now}
-- One more than the limit: the caller may be among them, and is skipped.
local dead = redis.call('ZRANGEBYSCORE', live_key, '-inf', now - ttl, 'WITHSCORES', 'LIMIT', 0,
  limit + 1)
local claimed = 0
for i = 1, #dead, 2 do
  if dead[i] ~= caller and claimed < limit then
    redis.call('ZREM', live_key, dead[i])
    redis.call('ZADD', dead_key, now, dead[i])
    out[#out + 1] = dead[i]
    out[#out + 1] = dead[i + 1]
    claimed = claimed + 1
  end
end
local stale = redis.call('ZRANGEBYSCORE', dead_key, '-inf', now - stale_ms, 'LIMIT', 0,
  limit + 1)
claimed = 0
for i = 1, #stale do
  if stale[i] ~= caller and claimed < limit then
    redis.call('ZADD', dead_key, now, stale[i])
    out[#out + 1] = stale[i]
    out[#out + 1] = tostring(now - ttl)
    claimed = claimed + 1
  end
end
return out
