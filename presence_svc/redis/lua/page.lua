-- Reads atomically a study's seq, its sessions by status and one page of its sessions in
-- user_id order: the first `limit` members after `after` (exclusive). The caller names the
-- members it expects on the page (from a plain read of the index); if they are not exactly the
-- page now (someone joined, or left), no session is read and the page's members come back, so
-- the caller can retry with their keys. Checking the named page costs one pass over the
-- members (two string comparisons each) and no sort; only that answer sorts them all.
-- Order: Lua's string comparison, which is byte order under the C locale Redis runs in by
-- default (and which fakeredis's Lua uses too). Counts: status_counts in _lib.lua.
-- KEYS[1] study index   KEYS[2] study meta   KEYS[3..] session hashes
-- ARGV[1] limit (1 or more)   ARGV[2] after ('': from the first member)
-- ARGV[3..] user ids, in the order of KEYS[3..]
-- Returns {1, seq, total, idle, away, next, hash1, hash2, ...}: a flat HGETALL reply for each
-- member of the page in user_id order (empty for a member whose hash is gone), next = the
-- page's last member when more follow, else ''; or {0, seq, total, idle, away, next, member1,
-- member2, ...}: the page's members, in that order.

local index_key, meta_key = KEYS[1], KEYS[2]
local limit, after = tonumber(ARGV[1]), ARGV[2]
local key_of = {}
for i = 3, #ARGV do key_of[ARGV[i]] = KEYS[i] end

local members = redis.call('ZRANGE', index_key, 0, -1)
local total, idle, away = status_counts(index_key, meta_key)
local seq = tonumber(redis.call('HGET', meta_key, 'seq') or '0')

-- The named members still here (after `after`), their last, and the first member after `after`
-- that was not named.
local page, last, first_other = {}, nil, nil
for i = 1, #members do
  local m = members[i]
  if after == '' or m > after then
    if key_of[m] then
      page[#page + 1] = m
      if not last or last < m then last = m end
    elseif not first_other or m < first_other then
      first_other = m
    end
  end
end

-- They are the page when nothing unnamed comes before their last, and either the page is full
-- or nothing unnamed follows at all.
local is_page = #page <= limit
  and (not first_other or (#page == limit and last < first_other))
if not is_page then
  local after_it = {}
  for i = 1, #members do
    if after == '' or members[i] > after then after_it[#after_it + 1] = members[i] end
  end
  table.sort(after_it)
  local next = ''
  if #after_it > limit then next = after_it[limit] end
  local out = {0, seq, total, idle, away, next}
  for i = 1, math.min(limit, #after_it) do out[#out + 1] = after_it[i] end
  return out
end

table.sort(page)
local next = ''
if first_other then next = last end
local out = {1, seq, total, idle, away, next}
for i = 1, #page do
  local session_key = key_of[page[i]]
  out[#out + 1] = redis.call('HGETALL', session_key)
end
return out
