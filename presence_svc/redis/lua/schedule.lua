-- Makes sure a study is swept no later than `due`. Runs after every heartbeat of the study.
-- If the study is already due, a sweep may be in flight that did not see this heartbeat; the
-- score is nudged so that sweep's reschedule (reschedule.lua) sees a change and cannot push the
-- study past this heartbeat's due time.
-- KEYS[1] schedule shard
-- ARGV[1] study_id   ARGV[2] due ms   ARGV[3] now ms
-- Returns 1.

local schedule_key = KEYS[1]
local study_id, due, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local current = redis.call('ZSCORE', schedule_key, study_id)
if not current or tonumber(current) > due then
  redis.call('ZADD', schedule_key, due, study_id)
elseif tonumber(current) <= now then
  redis.call('ZADD', schedule_key, tonumber(current) - 1, study_id)
end
return 1
