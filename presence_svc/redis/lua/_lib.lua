-- Shared prelude, prepended to every operation script when it is loaded.
-- A pure-Lua MessagePack encoder: fakeredis's Lua has no cmsgpack or struct, real Redis does,
-- and both must publish byte-identical envelopes. It covers what events need: nil, integers,
-- strings and maps with a fixed key order.

local MP_NIL = {}
-- SPUBLISH on Redis Cluster (scripts.py swaps this line): a sharded channel stays on its slot's
-- shard instead of being broadcast over the cluster bus.
local PUBLISH = 'PUBLISH'

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

-- Raises the study's seq by one and publishes one presence event for session `s`.
local function emit(meta_key, channel, event_type, s, now_iso, now_ms)
  local seq = redis.call('HINCRBY', meta_key, 'seq', 1)
  local data = mp_map({
    'session_id', s.session_id,
    'user_id', s.user_id,
    'study_id', s.study_id,
    'chapter_id', or_nil(s.chapter_id),
    'move_path', or_nil(s.move_path),
    'status', s.status,
    'timestamp', now_iso,
    'seq', seq,
  })
  local envelope = mp_map({'type', event_type, 'data', data, 'ts', now_ms})
  redis.call(PUBLISH, channel, envelope.mp_raw)
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

