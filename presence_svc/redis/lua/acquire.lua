-- A connection (again) holds a session it held before, without it counting as a heartbeat: used
-- when a node finds it was declared dead and its leases were released while it was still
-- serving their sockets.
-- The node holds them under new connection ids; one already released (a late or repeated call)
-- holds nothing, as in heartbeat.lua.
-- KEYS[1] session hash   KEYS[2] session's connection set   KEYS[3] study's pending leaves
-- KEYS[4] session's released connection ids
-- ARGV[1] user_id   ARGV[2] connection id
-- Returns 1 if the session exists and is now held, 0 if it has ended meanwhile (or the
-- connection id was released).

local session_key, conns_key, leaving_key, released_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local user_id, conn = ARGV[1], ARGV[2]

if redis.call('EXISTS', session_key) == 0 or released_at(released_key, conn) then
  return 0
end
hold(conns_key, leaving_key, user_id, conn)
return 1
