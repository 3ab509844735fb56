-- After a sweep of a study: moves its schedule entry to the study's next due time, or removes it
-- when the study is empty. If the entry changed since the sweeper picked it (a heartbeat lowered
-- or nudged it), the entry may only move earlier.
-- KEYS[1] schedule shard
-- ARGV[1] study_id   ARGV[2] score when picked   ARGV[3] next due ms ('' = study empty)

local current = redis.call('ZSCORE', KEYS[1], ARGV[1])
local next_due = tonumber(ARGV[3])
if current and tonumber(current) == tonumber(ARGV[2]) then
  if next_due then
    redis.call('ZADD', KEYS[1], next_due, ARGV[1])
  else
    redis.call('ZREM', KEYS[1], ARGV[1])
  end
elseif next_due and (not current or next_due < tonumber(current)) then
  redis.call('ZADD', KEYS[1], next_due, ARGV[1])
end
return 1
