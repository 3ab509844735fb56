-- Reads a study's sessions and the seq they reflect, atomically. The caller names the session
-- keys it may need (from a plain ZRANGE); if a member has joined since, nothing is read and the
-- current members come back so the caller can retry with their keys too. Named users who have
-- left since are simply absent from the result.
-- KEYS[1] study index   KEYS[2] study meta   KEYS[3..] session hashes
-- ARGV[1..] user ids, in the order of KEYS[3..]
-- Returns {1, seq, hash1, hash2, ...} (each hash a flat HGETALL reply, in the order of KEYS[3..],
-- empty for a user who left) or {0, members} (the index's members, lowest score first).

local index_key, meta_key = KEYS[1], KEYS[2]
local session_keys, user_ids = {}, {}
for i = 3, #KEYS do session_keys[#session_keys + 1] = KEYS[i] end
for i = 1, #ARGV do user_ids[i] = ARGV[i] end

local members = redis.call('ZRANGE', index_key, 0, -1)
local named = {}
for i = 1, #user_ids do named[user_ids[i]] = true end
for i = 1, #members do
  if not named[members[i]] then
    return {0, members}
  end
end

local out = {1, tonumber(redis.call('HGET', meta_key, 'seq') or '0')}
for i = 1, #session_keys do
  out[#out + 1] = redis.call('HGETALL', session_keys[i])
end
return out
