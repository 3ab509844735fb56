-- Records a heartbeat of (user, study): creates or refreshes the session and publishes what it
-- changed (user_joined; or user_active and/or cursor_moved).
-- Any heartbeat calls off a leave pending since the session's last connection closed; one sent
-- over a WebSocket also makes that connection hold the session (see release.lua).
-- KEYS[1] session hash   KEYS[2] study index   KEYS[3] study meta   KEYS[4] study channel
-- KEYS[5] session's connection set   KEYS[6] study's pending leaves
-- ARGV[1] user_id   ARGV[2] study_id   ARGV[3] now_ms   ARGV[4] now_iso
-- ARGV[5] session_id to use if the session is new
-- ARGV[6] '1' if chapter_id is given   ARGV[7] chapter_id ('' clears it)
-- ARGV[8] '1' if move_path is given    ARGV[9] move_path ('' clears it)
-- ARGV[10] connection id holding the session ('' for a heartbeat that holds nothing, e.g. REST)
-- Returns {session_id, chapter_id, move_path, status, last_heartbeat, joined_at, events}
-- with '' for an absent cursor field and events = the number of events published.

local now = tonumber(ARGV[3])
local existing = redis.call('HGETALL', KEYS[1])
local s
local is_new = #existing == 0
if is_new then
  s = {session_id = ARGV[5], user_id = ARGV[1], study_id = ARGV[2], status = 'active',
       joined_at = ARGV[3]}
else
  s = hash_to_table(existing)
end

local old_chapter, old_move, old_status = s.chapter_id, s.move_path, s.status
if ARGV[6] == '1' then
  if ARGV[7] == '' then s.chapter_id = nil else s.chapter_id = ARGV[7] end
end
if ARGV[8] == '1' then
  if ARGV[9] == '' then s.move_path = nil else s.move_path = ARGV[9] end
end

-- A node with a lagging clock must not move a heartbeat back in time.
local beat = now
if not is_new and tonumber(s.last_heartbeat) > now then
  beat = tonumber(s.last_heartbeat)
end
s.status = 'active'
s.last_heartbeat = beat

redis.call('HSET', KEYS[1], 'session_id', s.session_id, 'user_id', s.user_id,
  'study_id', s.study_id, 'status', 'active', 'last_heartbeat', beat, 'joined_at', s.joined_at)
if s.chapter_id then redis.call('HSET', KEYS[1], 'chapter_id', s.chapter_id)
else redis.call('HDEL', KEYS[1], 'chapter_id') end
if s.move_path then redis.call('HSET', KEYS[1], 'move_path', s.move_path)
else redis.call('HDEL', KEYS[1], 'move_path') end
redis.call('ZADD', KEYS[2], beat, ARGV[1])
redis.call('PERSIST', KEYS[3])
if ARGV[10] ~= '' then
  hold(KEYS[5], KEYS[6], ARGV[1], ARGV[10])
else
  redis.call('ZREM', KEYS[6], ARGV[1])
end

local events = 0
if is_new then
  emit(KEYS[3], KEYS[4], 'presence.user_joined', s, ARGV[4], now)
  events = 1
else
  if old_status ~= 'active' then
    emit(KEYS[3], KEYS[4], 'presence.user_active', s, ARGV[4], now)
    events = events + 1
  end
  if old_chapter ~= s.chapter_id or old_move ~= s.move_path then
    emit(KEYS[3], KEYS[4], 'presence.cursor_moved', s, ARGV[4], now)
    events = events + 1
  end
end

return {s.session_id, s.chapter_id or '', s.move_path or '', s.status, beat,
  tonumber(s.joined_at), events}
