-- Ends the session of (user, study) now and publishes user_left. Idempotent.
-- KEYS[1] session hash   KEYS[2] study index   KEYS[3] study meta   KEYS[4] study channel
-- KEYS[5] session's connection set   KEYS[6] study's pending leaves
-- ARGV[1] user_id   ARGV[2] now_ms   ARGV[3] now_iso   ARGV[4] empty-study meta TTL (ms)
-- Returns 1 if a session ended, 0 if there was none.

local existing = redis.call('HGETALL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('DEL', KEYS[5])
if #existing == 0 then
  return 0
end
redis.call('DEL', KEYS[1])
emit(KEYS[3], KEYS[4], 'presence.user_left', hash_to_table(existing), ARGV[3], tonumber(ARGV[2]))
settle_empty_study(KEYS[2], KEYS[3], tonumber(ARGV[4]))
return 1
