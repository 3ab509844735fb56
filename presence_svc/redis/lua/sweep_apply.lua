-- Phase 2 of a study's sweep: applies the transitions now due to the users phase 1 found,
-- re-checking each against its current heartbeat, status, connections and pending leave
-- (another node may have swept, or a heartbeat arrived, in between), so each transition is
-- published exactly once. A session some connection holds does not expire; it leaves once no
-- connection holds it and its pending leave time has come.
-- KEYS[1] study index   KEYS[2] study meta   KEYS[3] study channel   KEYS[4] pending leaves
-- KEYS[5..] for each user: its session hash, then its connection set
-- ARGV[1] now_ms   ARGV[2] now_iso   ARGV[3] idle_ms   ARGV[4] away_ms   ARGV[5] expire_ms
-- ARGV[6] idle watermark   ARGV[7] away watermark   ARGV[8] expire watermark
-- ARGV[9] empty-study meta TTL (ms)
-- ARGV[10] publish command: 'PUBLISH', or 'SPUBLISH' on Redis Cluster (anything else: an error)
-- ARGV[11..] user ids, in the order of the KEYS[5..] pairs
-- Returns {events published, next due ms (as text), or '' when the study is empty or nothing
-- can become due without a heartbeat or a release}.

local index_key, meta_key, channel, leaving_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, now_iso = tonumber(ARGV[1]), ARGV[2]
local idle_ms, away_ms, expire_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local idle_wm_arg, away_wm_arg = tonumber(ARGV[6]), tonumber(ARGV[7])
local expire_wm_arg, empty_ttl_ms = tonumber(ARGV[8]), tonumber(ARGV[9])
local publish = ARGV[10]
local users, session_keys, conns_keys = {}, {}, {}
for j = 11, #ARGV do
  local i = j - 10
  users[i], session_keys[i], conns_keys[i] = ARGV[j], KEYS[3 + 2 * i], KEYS[4 + 2 * i]
end
local pub = publisher(meta_key, channel, publish, now, now_iso)

local events = 0

for i = 1, #users do
  local user, session_key, conns_key = users[i], session_keys[i], conns_keys[i]
  local score = redis.call('ZSCORE', index_key, user)
  local leave_at = redis.call('ZSCORE', leaving_key, user)
  local existing = {}
  if score then existing = redis.call('HGETALL', session_key) end
  if #existing == 0 then
    -- Nothing to announce: drop whatever is left of a session that is already gone.
    drop_remains(index_key, leaving_key, conns_key, user)
  else
    local s = hash_to_table(existing)
    local age = now - tonumber(score)
    local held = redis.call('SCARD', conns_key) > 0
    -- A pending leave sets the time (its grace must not be cut short by the expiry age).
    local due = age >= expire_ms
    if leave_at then due = tonumber(leave_at) <= now end
    if not held and due then
      end_session(pub, index_key, leaving_key, session_key, conns_key, user, s)
      events = events + 1
    else
      if held and leave_at then
        -- A held session has no pending leave; a stale one would keep the study due forever.
        redis.call('ZREM', leaving_key, user)
      end
      if age >= away_ms and s.status ~= 'away' then
        local previous = s.status
        s.status = 'away'
        redis.call('HSET', session_key, 'status', 'away')
        emit(pub, 'presence.user_away', s, previous)
        events = events + 1
      elseif age >= idle_ms and s.status == 'active' then
        s.status = 'idle'
        redis.call('HSET', session_key, 'status', 'idle')
        emit(pub, 'presence.user_idle', s, 'active')
        events = events + 1
      end
    end
  end
end

local function raise(field, value)
  local current = redis.call('HGET', meta_key, field)
  if not current or tonumber(current) < value then
    redis.call('HSET', meta_key, field, value)
    return value
  end
  return tonumber(current)
end
local idle_wm = raise('idle_wm', idle_wm_arg)
local away_wm = raise('away_wm', away_wm_arg)
local expire_wm = raise('expire_wm', expire_wm_arg)

if settle_empty_study(index_key, meta_key, empty_ttl_ms) then
  return {events, ''}
end

-- The earliest moment anything in this study can next be due; early is harmless, late is not.
local next_due = nil
local function consider(t)
  if t and (not next_due or t < next_due) then next_due = t end
end
local function first_above(watermark, threshold_ms)
  local hit = redis.call('ZRANGEBYSCORE', index_key, '(' .. watermark, '+inf', 'WITHSCORES',
    'LIMIT', 0, 1)
  if #hit > 0 then consider(tonumber(hit[2]) + threshold_ms) end
end
first_above(idle_wm, idle_ms)
first_above(away_wm, away_ms)
first_above(expire_wm, expire_ms)
local leaving = redis.call('ZRANGE', leaving_key, 0, 0, 'WITHSCORES')
if #leaving > 0 then consider(tonumber(leaving[2])) end
if not next_due then
  -- Every session is past every threshold and held by a connection: only a heartbeat or a
  -- release can make anything due again, and both schedule the study themselves.
  return {events, ''}
end
return {events, tostring(next_due)}
