-- A connection (again) holds a session it held before, without it counting as a heartbeat: used
-- when a node finds it was declared dead and its leases were released while it was still
-- serving their sockets.
-- KEYS[1] session hash   KEYS[2] session's connection set   KEYS[3] study's pending leaves
-- ARGV[1] user_id   ARGV[2] connection id
-- Returns 1 if the session exists and is now held, 0 if it has ended meanwhile.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
hold(KEYS[2], KEYS[3], ARGV[1], ARGV[2])
return 1
