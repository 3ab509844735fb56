-- A node's periodic proof of life; renews every lease its sockets hold in one call.
-- KEYS[1] live nodes   KEYS[2] claimed dead nodes
-- ARGV[1] node_id   ARGV[2] now_ms
-- Returns 1 normally, 0 if the node had been declared dead (its leases may have been released
-- and must be taken again).

local live_key, dead_key = KEYS[1], KEYS[2]
local node_id, now_ms = ARGV[1], ARGV[2]

local known = redis.call('ZSCORE', live_key, node_id)
redis.call('ZADD', live_key, now_ms, node_id)
redis.call('ZREM', dead_key, node_id)
if known then
  return 1
end
return 0
