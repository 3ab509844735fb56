-- A node's periodic proof of life; renews every lease its sockets hold in one call.
-- KEYS[1] live nodes   KEYS[2] claimed dead nodes
-- ARGV[1] node_id   ARGV[2] now_ms
-- Returns 1 normally, 0 if the node had been declared dead (its leases may have been released
-- and must be taken again).

local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if known then
  return 1
end
return 0
