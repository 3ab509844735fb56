-- Phase 2 of a study's sweep: applies the transitions now due to the users phase 1 found,
-- re-checking each against its current heartbeat, status, connections and pending leave
-- (another node may have swept, or a heartbeat arrived, in between), so each transition is
-- published exactly once. A session some connection holds does not expire; it leaves once no
-- connection holds it and its pending leave time has come.
-- KEYS[1] study index   KEYS[2] study meta   KEYS[3] study channel   KEYS[4] pending leaves
-- KEYS[5..] for each user: its session hash, then its connection set
-- ARGV[1] now_ms   ARGV[2] now_iso   ARGV[3] idle_ms   ARGV[4] away_ms   ARGV[5] expire_ms
-- ARGV[6] idle watermark   ARGV[7] away watermark   ARGV[8] expire watermark
-- ARGV[9] empty-study meta TTL (ms)   ARGV[10..] user ids, in the order of KEYS[5..] pairs
-- Returns {events published, next due ms or '' when nothing can become due without a heartbeat
-- or a release}.

local now = tonumber(ARGV[1])
local idle_ms, away_ms, expire_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local events = 0

for j = 10, #ARGV do
  local user = ARGV[j]
  local session_key, conns_key = KEYS[5 + 2 * (j - 10)], KEYS[6 + 2 * (j - 10)]
  local score = redis.call('ZSCORE', KEYS[1], user)
  local leave_at = redis.call('ZSCORE', KEYS[4], user)
  local existing = {}
  if score then existing = redis.call('HGETALL', session_key) end
  if #existing == 0 then
    -- Nothing to announce: drop whatever is left of a session that is already gone.
    redis.call('ZREM', KEYS[1], user)
    redis.call('ZREM', KEYS[4], user)
    redis.call('DEL', conns_key)
  else
    local s = hash_to_table(existing)
    local age = now - tonumber(score)
    local held = redis.call('SCARD', conns_key) > 0
    -- A pending leave sets the time (its grace must not be cut short by the expiry age).
    local due = age >= expire_ms
    if leave_at then due = tonumber(leave_at) <= now end
    if not held and due then
      redis.call('DEL', session_key, conns_key)
      redis.call('ZREM', KEYS[1], user)
      redis.call('ZREM', KEYS[4], user)
      emit(KEYS[2], KEYS[3], 'presence.user_left', s, ARGV[2], now)
      events = events + 1
    else
      if held and leave_at then
        -- A held session has no pending leave; a stale one would keep the study due forever.
        redis.call('ZREM', KEYS[4], user)
      end
      if age >= away_ms and s.status ~= 'away' then
        s.status = 'away'
        redis.call('HSET', session_key, 'status', 'away')
        emit(KEYS[2], KEYS[3], 'presence.user_away', s, ARGV[2], now)
        events = events + 1
      elseif age >= idle_ms and s.status == 'active' then
        s.status = 'idle'
        redis.call('HSET', session_key, 'status', 'idle')
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
local expire_wm = raise('expire_wm', tonumber(ARGV[8]))

if settle_empty_study(KEYS[1], KEYS[2], tonumber(ARGV[9])) then
  return {events, ''}
end

-- The earliest moment anything in this study can next be due; early is harmless, late is not.
local next_due = nil
local function consider(t)
  if t and (not next_due or t < next_due) then next_due = t end
end
local function first_above(watermark, threshold_ms)
  local hit = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. watermark, '+inf', 'WITHSCORES',
    'LIMIT', 0, 1)
  if #hit > 0 then consider(tonumber(hit[2]) + threshold_ms) end
end
first_above(idle_wm, idle_ms)
first_above(away_wm, away_ms)
first_above(expire_wm, expire_ms)
local leaving = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
if #leaving > 0 then consider(tonumber(leaving[2])) end
if not next_due then
  -- Every session is past every threshold and held by a connection: only a heartbeat or a
  -- release can make anything due again, and both schedule the study themselves.
  return {events, ''}
end
return {events, tostring(next_due)}
