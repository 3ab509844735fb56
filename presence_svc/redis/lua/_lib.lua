-- Shared prelude: scripts.py loads every operation script as this file, a newline, then the
-- script (and maps the line numbers in Redis's errors back to the two files).
-- A pure-Lua MessagePack encoder: fakeredis's Lua has no cmsgpack or struct, real Redis does,
-- and both must publish byte-identical envelopes. It covers what events need: nil, integers,
-- strings and maps with a fixed key order.

local MP_NIL = {}

local function mp_uint(n, width)
  local out = {}
  for i = width, 1, -1 do
    out[i] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  return table.concat(out)
end

local function mp_value(v)
  if v == nil or v == MP_NIL then
    return string.char(0xc0)
  end
  local t = type(v)
  if t == 'number' then
    if v ~= math.floor(v) then
      error('mp_value: only integers are encoded, got ' .. tostring(v))
    end
    if v >= 0 then
      if v < 128 then return string.char(v) end
      if v < 256 then return string.char(0xcc, v) end
      if v < 65536 then return string.char(0xcd) .. mp_uint(v, 2) end
      if v < 4294967296 then return string.char(0xce) .. mp_uint(v, 4) end
      return string.char(0xcf) .. mp_uint(v, 8)
    end
    if v >= -32 then return string.char(256 + v) end
    if v >= -2147483648 then return string.char(0xd2) .. mp_uint(4294967296 + v, 4) end
    error('mp_value: integer out of range ' .. tostring(v))
  end
  if t == 'string' then
    local n = #v
    if n < 32 then return string.char(0xa0 + n) .. v end
    if n < 256 then return string.char(0xd9, n) .. v end
    if n < 65536 then return string.char(0xda) .. mp_uint(n, 2) .. v end
    return string.char(0xdb) .. mp_uint(n, 4) .. v
  end
  if t == 'table' and v.mp_raw then
    return v.mp_raw
  end
  error('mp_value: cannot encode ' .. t)
end

-- pairs: {k1, v1, k2, v2, ...}; MP_NIL stands for a nil value. Returns an already-encoded value.
local function mp_map(pairs_list)
  local n = #pairs_list / 2
  local parts = {}
  if n < 16 then
    parts[1] = string.char(0x80 + n)
  else
    parts[1] = string.char(0xde) .. mp_uint(n, 2)
  end
  for i = 1, #pairs_list do
    parts[i + 1] = mp_value(pairs_list[i])
  end
  return {mp_raw = table.concat(parts)}
end

local function hash_to_table(flat)
  local t = {}
  for i = 1, #flat, 2 do
    t[flat[i]] = flat[i + 1]
  end
  return t
end

local function or_nil(v)
  if v == nil then return MP_NIL end
  return v
end

-- Where and how a script publishes a study's events: the study's meta hash (holding its seq),
-- its channel, the publish command and the time the events carry. The command comes from the
-- caller (SPUBLISH on Redis Cluster: a sharded channel stays on its slot's shard instead of
-- being broadcast over the cluster bus); only these two commands are run, so a caller's bug
-- cannot make a script run anything else. The error names the script's line (level 2), and
-- scripts call this before they write anything.
local function publisher(meta_key, channel, command, now_ms, now_iso)
  if command ~= 'PUBLISH' and command ~= 'SPUBLISH' then
    error('publish command must be PUBLISH or SPUBLISH, got ' .. tostring(command), 2)
  end
  return {meta_key = meta_key, channel = channel, command = command, now_ms = now_ms,
    now_iso = now_iso}
end

-- Raises the study's seq by one and publishes one presence event for session `s`. `previous`
-- is the status it changed from (user_idle, user_away, user_active; nil for the other events):
-- with it a client that lists only some users still keeps the study's counts exact.
local function emit(pub, event_type, s, previous)
  local seq = redis.call('HINCRBY', pub.meta_key, 'seq', 1)
  local data = mp_map({
    'session_id', s.session_id,
    'user_id', s.user_id,
    'study_id', s.study_id,
    'chapter_id', or_nil(s.chapter_id),
    'move_path', or_nil(s.move_path),
    'status', s.status,
    'previous_status', or_nil(previous),
    'timestamp', pub.now_iso,
    'seq', seq,
  })
  local envelope = mp_map({'type', event_type, 'data', data, 'ts', pub.now_ms})
  redis.call(pub.command, pub.channel, envelope.mp_raw)
  return seq
end

-- An empty study keeps its seq for a while, so clients watching it never see seq go backwards.
local function settle_empty_study(index_key, meta_key, empty_ttl_ms)
  if redis.call('ZCARD', index_key) == 0 then
    redis.call('PEXPIRE', meta_key, empty_ttl_ms)
    return true
  end
  return false
end

-- Marks the session as held by connection `conn`: it cannot expire while any connection holds it,
-- and a leave pending since its last connection closed is called off.
local function hold(conns_key, leaving_key, user_id, conn)
  redis.call('SADD', conns_key, conn)
  redis.call('ZREM', leaving_key, user_id)
end

-- When connection `conn` was released from the session: the leave time its release gave (a
-- number), or nil if it never was. Connection ids are never reused, so a call under a released
-- id is one that reached Redis after that release (delayed by a stall) and must not hold.
local function released_at(released_key, conn)
  return tonumber(redis.call('ZSCORE', released_key, conn))
end

-- As `hold`, unless `conn` was released: then it holds nothing, calls nothing off, and the
-- release's leave time is returned (nil otherwise). Only a connection's first hold looks it up,
-- so a heartbeat of a connection that already holds the session costs nothing more: a released
-- id has left the connection set for good.
local function hold_unless_released(conns_key, leaving_key, released_key, user_id, conn)
  if redis.call('SADD', conns_key, conn) == 1 then
    local leave_at = released_at(released_key, conn)
    if leave_at then
      redis.call('SREM', conns_key, conn)
      return leave_at
    end
  end
  redis.call('ZREM', leaving_key, user_id)
  return nil
end

-- The unheld session of `user_id` leaves at `leave_at`, unless an earlier leave is pending: a
-- pending leave only ever moves earlier.
local function leave_by(leaving_key, user_id, leave_at)
  local pending = redis.call('ZSCORE', leaving_key, user_id)
  if not pending or tonumber(pending) > leave_at then
    redis.call('ZADD', leaving_key, leave_at, user_id)
  end
end

-- Removes what may be left of a user's session besides its hash: its index entry, its pending
-- leave and its connection set.
local function drop_remains(index_key, leaving_key, conns_key, user_id)
  redis.call('ZREM', index_key, user_id)
  redis.call('ZREM', leaving_key, user_id)
  redis.call('DEL', conns_key)
end

-- Ends session `s` (its hash as a table) of `user_id`: deletes it and all it has in the study,
-- raises seq and publishes user_left. The caller settles the study if it may now be empty.
-- The ids released from it (release.lua) are kept until they expire: a heartbeat delayed past
-- the end must not hold the user's next session for a connection that is gone either.
local function end_session(pub, index_key, leaving_key, session_key, conns_key, user_id, s)
  redis.call('DEL', session_key)
  drop_remains(index_key, leaving_key, conns_key, user_id)
  emit(pub, 'presence.user_left', s)
end

-- A study's sessions by status, from its index and the sweep's watermarks in its meta: a
-- session whose last heartbeat is at or below away_wm is away, else at or below idle_wm idle,
-- else active (a watermark absent: nothing handled for it yet). By the sweep's design this is
-- each session's stored status: sweep_apply.lua raises a watermark only once every session at
-- or below it has had its transition, and a heartbeat moves its session above both. Three
-- O(log n) counts, no session read. Returns total, idle, away.
local function status_counts(index_key, meta_key)
  local total = redis.call('ZCARD', index_key)
  local watermarks = redis.call('HMGET', meta_key, 'idle_wm', 'away_wm')
  local idle_wm, away_wm = watermarks[1], watermarks[2]
  local away, idle = 0, 0
  local above_away = '-inf'
  if away_wm then
    away = redis.call('ZCOUNT', index_key, '-inf', away_wm)
    above_away = '(' .. away_wm
  end
  if idle_wm then
    -- Empty (min above max) if idle_wm is not above away_wm: nobody is idle then.
    idle = redis.call('ZCOUNT', index_key, above_away, idle_wm)
  end
  return total, idle, away
end
