-- Records a heartbeat of (user, study): creates or refreshes the session and publishes what it
-- changed (user_joined; or user_active and/or cursor_moved).
-- Any heartbeat calls off a leave pending since the session's last connection closed; one sent
-- over a WebSocket also makes that connection hold the session (see release.lua).
-- Except one whose connection was already released: it was sent before that release and was
-- delayed (a stall), so it is applied as if it had come first. If the session exists, it is
-- recorded as a heartbeat of the user (last_heartbeat, status, cursor, their events) but holds
-- nothing, and, unless another connection holds the session, the session leaves at the time
-- that release gave (or at an earlier pending leave). If there is no session (it has ended, or
-- the release overtook the connection's first heartbeat), it starts none: its socket is closed,
-- and a session started for it would be a ghost, joined and listed until a sweep ends it. It
-- then writes and publishes nothing.
-- A steady heartbeat (ARGV[12] = '1') is one the node sends when a heartbeat of this same
-- connection has already held the session, listed its lease and scheduled the study: the node
-- sends no lease SADD and no schedule.lua with it. The script checks what the node cannot see:
-- the connection must still hold the session (a reap, a release, an ended session all take it
-- out of the connection set, and only a heartbeat with its lease listed ahead may put it back),
-- else it writes nothing and returns 0 for the node to send a full heartbeat instead. A held
-- session has no pending leave (every hold removes it), so there is none to call off. It
-- returns `covered` = 0 when the session was idle or away: the study's schedule then follows
-- that older status and the node must schedule this heartbeat's due time (schedule.lua).
-- Only what changed is written: the meta has a TTL only while the study has no session, so it
-- is PERSISTed for a new session only; cursor fields are deleted only if they were set.
-- KEYS[1] session hash   KEYS[2] study index   KEYS[3] study meta   KEYS[4] study channel
-- KEYS[5] session's connection set   KEYS[6] study's pending leaves
-- KEYS[7] session's released connection ids
-- ARGV[1] user_id   ARGV[2] study_id   ARGV[3] now_ms   ARGV[4] now_iso
-- ARGV[5] session_id to use if the session is new
-- ARGV[6] '1' if chapter_id is given   ARGV[7] chapter_id ('' clears it)
-- ARGV[8] '1' if move_path is given    ARGV[9] move_path ('' clears it)
-- ARGV[10] connection id holding the session ('' for a heartbeat that holds nothing, e.g. REST)
-- ARGV[11] publish command: 'PUBLISH', or 'SPUBLISH' on Redis Cluster (anything else: an error)
-- ARGV[12] '1' for a steady heartbeat (above; needs a connection id), absent or '0' otherwise
-- Returns {session_id, chapter_id, move_path, status, last_heartbeat, joined_at, events,
-- covered} with '' for an absent cursor field, events = the number of events published and
-- covered = 1 if a steady heartbeat found the session active (its study needs no scheduling),
-- else 0; or {} (an empty array) when nothing was written: no session, and the connection id
-- was released; or 0 when a steady heartbeat's connection does not hold the session (nothing
-- written).

local session_key, index_key, meta_key, channel = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local conns_key, leaving_key, released_key = KEYS[5], KEYS[6], KEYS[7]
local user_id, study_id, now_ms, now_iso = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local new_session_id = ARGV[5]
local sets_chapter, chapter_id = ARGV[6] == '1', ARGV[7]
local sets_move, move_path = ARGV[8] == '1', ARGV[9]
local conn, publish = ARGV[10], ARGV[11]
local steady = ARGV[12] == '1' and conn ~= ''
local now = tonumber(now_ms)  -- now_ms stays text for joined_at, stored exactly as given
local pub = publisher(meta_key, channel, publish, now, now_iso)

if steady and redis.call('SISMEMBER', conns_key, conn) == 0 then
  return 0
end
local existing = redis.call('HGETALL', session_key)
local s
local is_new = #existing == 0
if is_new and steady then
  return 0  -- a connection set without its session: the full heartbeat puts both right
end
if is_new and conn ~= '' and released_at(released_key, conn) then
  return {}
end
if is_new then
  s = {session_id = new_session_id, user_id = user_id, study_id = study_id, status = 'active',
       joined_at = now_ms}
else
  s = hash_to_table(existing)
end

local old_chapter, old_move, old_status = s.chapter_id, s.move_path, s.status
if sets_chapter then
  if chapter_id == '' then s.chapter_id = nil else s.chapter_id = chapter_id end
end
if sets_move then
  if move_path == '' then s.move_path = nil else s.move_path = move_path end
end

-- A node with a lagging clock must not move a heartbeat back in time.
local beat = now
if not is_new and tonumber(s.last_heartbeat) > now then
  beat = tonumber(s.last_heartbeat)
end
s.status = 'active'
s.last_heartbeat = beat

local fields = {'last_heartbeat', beat}
if is_new then
  for _, f in ipairs({'session_id', 'user_id', 'study_id', 'joined_at'}) do
    fields[#fields + 1] = f
    fields[#fields + 1] = s[f]
  end
end
if old_status ~= 'active' or is_new then
  fields[#fields + 1] = 'status'
  fields[#fields + 1] = 'active'
end
local cleared = {}
if s.chapter_id ~= old_chapter then
  if s.chapter_id then
    fields[#fields + 1] = 'chapter_id'
    fields[#fields + 1] = s.chapter_id
  else
    cleared[#cleared + 1] = 'chapter_id'
  end
end
if s.move_path ~= old_move then
  if s.move_path then
    fields[#fields + 1] = 'move_path'
    fields[#fields + 1] = s.move_path
  else
    cleared[#cleared + 1] = 'move_path'
  end
end
redis.call('HSET', session_key, unpack(fields))
if #cleared > 0 then redis.call('HDEL', session_key, unpack(cleared)) end
redis.call('ZADD', index_key, beat, user_id)
if is_new then redis.call('PERSIST', meta_key) end
if conn == '' then
  redis.call('ZREM', leaving_key, user_id)
elseif not steady then
  local released = hold_unless_released(conns_key, leaving_key, released_key, user_id, conn)
  if released and redis.call('SCARD', conns_key) == 0 then
    leave_by(leaving_key, user_id, released)
  elseif released then
    redis.call('ZREM', leaving_key, user_id)
  end
end

local events = 0
if is_new then
  emit(pub, 'presence.user_joined', s)
  events = 1
else
  if old_status ~= 'active' then
    emit(pub, 'presence.user_active', s, old_status)
    events = events + 1
  end
  if old_chapter ~= s.chapter_id or old_move ~= s.move_path then
    emit(pub, 'presence.cursor_moved', s)
    events = events + 1
  end
end

local covered = 0
if steady and old_status == 'active' then covered = 1 end
return {s.session_id, s.chapter_id or '', s.move_path or '', s.status, beat,
  tonumber(s.joined_at), events, covered}
