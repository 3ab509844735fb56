// The pure parts of the browser client: roster, seq ordering, backoff, close codes, tokens.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  Backoff,
  Roster,
  SeqOrderer,
  closeAction,
  diffRosters,
  httpBase,
  refreshDelay,
  socketBase,
  tokenExpiry,
} from "../../../presence_svc/web/client/presence-state.js";

const alice = {
  session_id: "s-a",
  user_id: "alice",
  study_id: "st",
  chapter_id: "ch1",
  move_path: "main.1",
  status: "active",
  last_heartbeat: "2026-01-01T00:00:01.000Z",
  joined_at: "2026-01-01T00:00:00.000Z",
};
// An event's data: a session's fields without the listing's times, plus its own.
const { last_heartbeat: _lh, joined_at: _ja, ...aliceEvent } = alice;
const event = (type, seq, fields) => ({
  type,
  seq,
  data: { study_id: "st", status: "active", timestamp: `2026-01-01T00:01:0${seq}.000Z`, seq, ...fields },
});

test("a roster from a snapshot, then changed by each event", () => {
  const roster = new Roster();
  roster.reset([alice]);
  const joined = roster.apply("presence.user_joined", event("", 2, { user_id: "bob", session_id: "s-b" }).data);
  assert.equal(joined.kind, "join");
  assert.equal(joined.user.joined_at, "2026-01-01T00:01:02.000Z");
  assert.equal("seq" in joined.user, false);
  const moved = roster.apply("presence.cursor_moved", { ...aliceEvent, move_path: "main.2", seq: 3, timestamp: "t3" });
  assert.equal(moved.kind, "cursor");
  assert.equal(moved.previous.move_path, "main.1");
  const idle = roster.apply("presence.user_idle", { ...aliceEvent, move_path: "main.2", status: "idle", seq: 4, timestamp: "t4" });
  assert.equal(idle.kind, "status");
  // An idle transition is not a heartbeat: last_heartbeat stays the last one seen.
  assert.equal(idle.user.last_heartbeat, "t3");
  assert.deepEqual(roster.users().map((user) => [user.user_id, user.status]), [["alice", "idle"], ["bob", "active"]]);
  assert.equal(roster.apply("presence.user_left", { user_id: "bob", seq: 5 }).kind, "leave");
  assert.deepEqual(roster.users().map((user) => user.user_id), ["alice"]);
});

test("a join or leave the snapshot already reflected is no second join or leave", () => {
  const roster = new Roster();
  roster.reset([alice]);
  assert.equal(roster.apply("presence.user_joined", { ...alice, seq: 9, timestamp: "t" }).kind, "update");
  assert.equal(roster.apply("presence.user_left", { user_id: "carol", seq: 10 }).kind, "none");
  assert.equal(roster.users().length, 1);
});

test("events before the snapshot are held; those at or below its seq are dropped", () => {
  const orderer = new SeqOrderer();
  for (const seq of [6, 4, 5, 7]) assert.deepEqual(orderer.push({ seq }), { apply: [], gap: null });
  const { apply, gap } = orderer.snapshot(5);
  assert.deepEqual(apply.map((each) => each.seq), [6, 7]);
  assert.equal(gap, null);
  assert.deepEqual(orderer.push({ seq: 7 }).apply, []); // a duplicate
  assert.deepEqual(orderer.push({ seq: 8 }).apply.map((each) => each.seq), [8]);
});

test("a hole in seq is a gap, reported instead of guessed over", () => {
  const orderer = new SeqOrderer();
  orderer.snapshot(3);
  assert.deepEqual(orderer.push({ seq: 4 }).apply.map((each) => each.seq), [4]);
  assert.deepEqual(orderer.push({ seq: 6 }), { apply: [], gap: { expected: 5, got: 6 } });
  // Held events that do not follow the snapshot are a gap too.
  orderer.restart();
  orderer.push({ seq: 12 });
  assert.deepEqual(orderer.snapshot(10).gap, { expected: 11, got: 12 });
  // A later snapshot (a resync) sets a new floor.
  assert.deepEqual(orderer.snapshot(20).apply, []);
  assert.deepEqual(orderer.push({ seq: 21 }).apply.map((each) => each.seq), [21]);
});

test("backoff: full jitter under a doubling bound, capped, reset on demand", () => {
  const backoff = new Backoff({ base: 500, cap: 20000, random: () => 0.999999 });
  const delays = Array.from({ length: 8 }, () => Math.round(backoff.next()));
  assert.deepEqual(delays, [500, 1000, 2000, 4000, 8000, 16000, 20000, 20000]);
  backoff.reset();
  assert.equal(Math.round(backoff.next()), 500);
  const zero = new Backoff({ random: () => 0 });
  assert.equal(zero.next(), 0);
  const spread = new Backoff({ base: 500, cap: 20000 });
  for (let i = 0; i < 200; i += 1) {
    spread.attempt = 10;
    const delay = spread.next();
    assert.ok(delay >= 0 && delay < 20000, `${delay}`);
  }
});

test("each close code gets its documented reaction", () => {
  assert.equal(closeAction(1012).action, "now");
  assert.equal(closeAction(4401).action, "token");
  for (const code of [4400, 4403]) assert.equal(closeAction(code).action, "stop");
  for (const code of [1008, 1013, 1007, 1009, 1011, 4429, 1006, 1000, 1234])
    assert.equal(closeAction(code).action, "backoff", `${code}`);
  assert.equal(closeAction(1008).error, "rate_limited");
  assert.equal(closeAction(1006).error, null);
});

test("token expiry from the JWT, and a refresh well before it", () => {
  const payload = Buffer.from(JSON.stringify({ sub: "alice", exp: 1700000000 })).toString("base64url");
  assert.equal(tokenExpiry(`h.${payload}.s`), 1700000000 * 1000);
  assert.equal(tokenExpiry("not a jwt"), null);
  assert.equal(tokenExpiry(null), null);
  assert.equal(refreshDelay(100000 + 600000, 100000), 540000); // 60 s before a 10 min token
  assert.equal(refreshDelay(4000, 0), 3000); // a quarter of a short one's life
  assert.equal(refreshDelay(1500, 0), 500); // at least 1 s before
  assert.equal(refreshDelay(0, 5000), 0); // already expired: at once
});

test("socket and HTTP base URLs from any scheme", () => {
  assert.equal(socketBase("https://p.example/"), "wss://p.example");
  assert.equal(socketBase("http://127.0.0.1:8000/pre"), "ws://127.0.0.1:8000/pre");
  assert.equal(socketBase("wss://p.example"), "wss://p.example");
  assert.equal(httpBase("wss://p.example/x/"), "https://p.example/x");
  assert.equal(httpBase("ws://h:1"), "http://h:1");
});

test("a fresh snapshot is reported as the joins, leaves and moves it implies", () => {
  const bob = { ...alice, user_id: "bob" };
  const before = new Map([["alice", alice], ["bob", bob]]);
  const after = new Map([
    ["alice", { ...alice, move_path: "main.9" }],
    ["carol", { ...alice, user_id: "carol" }],
  ]);
  const kinds = diffRosters(before, after).map(({ kind, user }) => `${kind}:${user.user_id}`);
  assert.deepEqual(kinds, ["cursor:alice", "join:carol", "leave:bob"]);
});
