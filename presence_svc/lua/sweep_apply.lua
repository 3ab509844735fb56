-- Phase 2 of a study's sweep: applies the transitions now due to the users phase 1 found,
-- re-checking each against its current heartbeat and status (another node may have swept, or a
-- heartbeat may have arrived, in between), so each transition is published exactly once.
-- KEYS[1] study index   KEYS[2] study meta   KEYS[3] study channel   KEYS[4..] session hashes
-- ARGV[1] now_ms   ARGV[2] now_iso   ARGV[3] idle_ms   ARGV[4] away_ms   ARGV[5] expire_ms
-- ARGV[6] idle watermark   ARGV[7] away watermark   ARGV[8] empty-study meta TTL (ms)
-- ARGV[9..] user ids, in the order of KEYS[4..]
-- Returns {events published, next due ms or '' when the study is empty}.

local now = tonumber(ARGV[1])
local idle_ms, away_ms, expire_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local events = 0

for i = 4, #KEYS do
  local user = ARGV[i + 5]
  local score = redis.call('ZSCORE', KEYS[1], user)
  if score then
    local existing = redis.call('HGETALL', KEYS[i])
    if #existing == 0 then
      -- An index entry without its session cannot be announced; drop it.
      redis.call('ZREM', KEYS[1], user)
    else
      local s = hash_to_table(existing)
      local age = now - tonumber(score)
      if age >= expire_ms then
        redis.call('DEL', KEYS[i])
        redis.call('ZREM', KEYS[1], user)
        emit(KEYS[2], KEYS[3], 'presence.user_left', s, ARGV[2], now)
        events = events + 1
      elseif age >= away_ms and s.status ~= 'away' then
        s.status = 'away'
        redis.call('HSET', KEYS[i], 'status', 'away')
        emit(KEYS[2], KEYS[3], 'presence.user_away', s, ARGV[2], now)
        events = events + 1
      elseif age >= idle_ms and s.status == 'active' then
        s.status = 'idle'
        redis.call('HSET', KEYS[i], 'status', 'idle')
        emit(KEYS[2], KEYS[3], 'presence.user_idle', s, ARGV[2], now)
        events = events + 1
      end
    end
  end
end

local function raise(field, value)
  local current = redis.call('HGET', KEYS[2], field)
  if not current or tonumber(current) < value then
    redis.call('HSET', KEYS[2], field, value)
    return value
  end
  return tonumber(current)
end
local idle_wm = raise('idle_wm', tonumber(ARGV[6]))
local away_wm = raise('away_wm', tonumber(ARGV[7]))

if settle_empty_study(KEYS[1], KEYS[2], tonumber(ARGV[8])) then
  return {events, ''}
end

-- The earliest moment anything in this study can next be due; early is harmless, late is not.
local function first_above(watermark)
  local hit = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. watermark, '+inf', 'WITHSCORES',
    'LIMIT', 0, 1)
  if #hit == 0 then return nil end
  return tonumber(hit[2])
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local next_due = tonumber(oldest[2]) + expire_ms
local first_active = first_above(idle_wm)
if first_active and first_active + idle_ms < next_due then next_due = first_active + idle_ms end
local first_not_away = first_above(away_wm)
if first_not_away and first_not_away + away_ms < next_due then
  next_due = first_not_away + away_ms
end
return {events, tostring(next_due)}
