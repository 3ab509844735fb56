-- After a sweep of a study: moves its schedule entry to the study's next due time, or removes it
-- when the study is empty. If the entry changed since the sweeper picked it (a heartbeat lowered
-- or nudged it), the entry may only move earlier.
-- KEYS[1] schedule shard
-- ARGV[1] study_id   ARGV[2] score when picked   ARGV[3] next due ms ('' = study empty)
-- Returns 1.

local schedule_key = KEYS[1]
local study_id, picked, next_due = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local current = redis.call('ZSCORE', schedule_key, study_id)
if current and tonumber(current) == picked then
  if next_due then
    redis.call('ZADD', schedule_key, next_due, study_id)
  else
    redis.call('ZREM', schedule_key, study_id)
  end
elseif next_due and (not current or next_due < tonumber(current)) then
  redis.call('ZADD', schedule_key, next_due, study_id)
end
return 1
