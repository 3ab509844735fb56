-- Reads atomically a study's seq, its sessions by status and the sessions of a selection of its
-- members: the `cap` with the most recent heartbeats, or every member (cap 0). The caller names
-- the session keys it expects the selection to need (from a plain read of the same selection);
-- if the selection now holds a member it did not name (someone joined, or a heartbeat moved
-- them into the top), no session is read and the selection's members come back, so the caller
-- can retry with their keys. Named users outside the selection (they left, or dropped out of
-- the top) are not read. Counts: status_counts in _lib.lua.
-- KEYS[1] study index   KEYS[2] study meta   KEYS[3..] session hashes
-- ARGV[1] cap (0: every member)   ARGV[2..] user ids, in the order of KEYS[3..]
-- Returns {1, seq, total, idle, away, hash1, hash2, ...}: a flat HGETALL reply for each member
-- of the selection (oldest heartbeat first; empty for a member whose hash is gone), or
-- {0, seq, total, idle, away, member1, member2, ...}: the selection's members, in that order.

local index_key, meta_key = KEYS[1], KEYS[2]
local cap = tonumber(ARGV[1])
local key_of = {}
for i = 2, #ARGV do key_of[ARGV[i]] = KEYS[i + 1] end

-- The last `cap` by (score, member): the most recent heartbeats, oldest of them first.
local first = 0
if cap > 0 then first = -cap end
local selection = redis.call('ZRANGE', index_key, first, -1)

local total, idle, away = status_counts(index_key, meta_key)
local seq = tonumber(redis.call('HGET', meta_key, 'seq') or '0')

for i = 1, #selection do
  if not key_of[selection[i]] then
    local out = {0, seq, total, idle, away}
    for j = 1, #selection do out[#out + 1] = selection[j] end
    return out
  end
end

local out = {1, seq, total, idle, away}
for i = 1, #selection do
  local session_key = key_of[selection[i]]
  out[#out + 1] = redis.call('HGETALL', session_key)
end
return out
