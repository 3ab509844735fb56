-- Ends the session of (user, study) now and publishes user_left. Idempotent.
-- KEYS[1] session hash   KEYS[2] study index   KEYS[3] study meta   KEYS[4] study channel
-- KEYS[5] session's connection set   KEYS[6] study's pending leaves
-- ARGV[1] user_id   ARGV[2] now_ms   ARGV[3] now_iso   ARGV[4] empty-study meta TTL (ms)
-- ARGV[5] publish command: 'PUBLISH', or 'SPUBLISH' on Redis Cluster (anything else: an error)
-- Returns 1 if a session ended, 0 if there was none.

local session_key, index_key, meta_key, channel = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local conns_key, leaving_key = KEYS[5], KEYS[6]
local user_id, now_ms, now_iso, empty_ttl_ms = ARGV[1], tonumber(ARGV[2]), ARGV[3],
  tonumber(ARGV[4])
local pub = publisher(meta_key, channel, ARGV[5], now_ms, now_iso)

local existing = redis.call('HGETALL', session_key)
if #existing == 0 then
  drop_remains(index_key, leaving_key, conns_key, user_id)
  return 0
end
end_session(pub, index_key, leaving_key, session_key, conns_key, user_id,
  hash_to_table(existing))
settle_empty_study(index_key, meta_key, empty_ttl_ms)
return 1
