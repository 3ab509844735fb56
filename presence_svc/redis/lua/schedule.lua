-- Makes sure a study is swept no later than `due`. Runs after every heartbeat of the study.
-- If the study is already due, a sweep may be in flight that did not see this heartbeat; the
-- score is nudged so that sweep's reschedule (reschedule.lua) sees a change and cannot push the
-- study past this heartbeat's due time.
-- KEYS[1] schedule shard
-- ARGV[1] study_id   ARGV[2] due ms   ARGV[3] now ms

local current = redis.call('ZSCORE', KEYS[1], ARGV[1])
local due, now = tonumber(ARGV[2]), tonumber(ARGV[3])
if not current or tonumber(current) > due then
  redis.call('ZADD', KEYS[1], due, ARGV[1])
elseif tonumber(current) <= now then
  redis.call('ZADD', KEYS[1], tonumber(current) - 1, ARGV[1])
end
return 1
