-- Phase 1 of a study's sweep (read-only): which users may have a transition due.
-- Each threshold (idle, away, expiry) has a watermark in the study meta: every session whose
-- last heartbeat is at or below it has already been handled for that threshold, so a scan reads
-- only the window between the watermark and the threshold, and its cost follows the number of
-- due sessions. Pending leaves (sessions no connection holds any more) are due by their own time.
-- KEYS[1] study index   KEYS[2] study meta   KEYS[3] study's pending leaves
-- ARGV[1] now_ms   ARGV[2] idle_ms   ARGV[3] away_ms   ARGV[4] expire_ms   ARGV[5] limit per window
-- Returns {idle_watermark, away_watermark, expire_watermark, user1, user2, ...}: the watermarks
-- that may be stored once these users are handled (held back when a window was cut short), as
-- text, then each user found once (pending leaves first).

local index_key, meta_key, leaving_key = KEYS[1], KEYS[2], KEYS[3]
local now, idle_ms, away_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local expire_ms, limit = tonumber(ARGV[4]), tonumber(ARGV[5])

local meta = redis.call('HMGET', meta_key, 'idle_wm', 'away_wm', 'expire_wm')

local seen, users = {}, {}
local function collect(flat, step)
  for i = 1, #flat, step do
    if not seen[flat[i]] then
      seen[flat[i]] = true
      users[#users + 1] = flat[i]
    end
  end
end

local function window(watermark, threshold_ms)
  local upper = now - threshold_ms
  local lower = '-inf'
  if watermark then lower = '(' .. watermark end
  local hits = redis.call('ZRANGEBYSCORE', index_key, lower, upper, 'WITHSCORES', 'LIMIT', 0, limit)
  collect(hits, 2)
  if #hits / 2 >= limit then
    -- Cut short: sessions sharing the last score may be unread, so read them all and stop at
    -- it (stopping below it would never progress if `limit` sessions share that score).
    local last = hits[#hits]
    collect(redis.call('ZRANGEBYSCORE', index_key, last, last), 1)
    return tonumber(last)
  end
  return upper
end

collect(redis.call('ZRANGEBYSCORE', leaving_key, '-inf', now, 'LIMIT', 0, limit), 1)
local expire_wm = window(meta[3], expire_ms)
local away_wm = window(meta[2], away_ms)
local idle_wm = window(meta[1], idle_ms)

local out = {tostring(idle_wm), tostring(away_wm), tostring(expire_wm)}
for i = 1, #users do out[#out + 1] = users[i] end
return out
