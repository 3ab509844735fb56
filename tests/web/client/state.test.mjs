// The pure parts of the browser client: roster (and a big room's counts), seq ordering and
// batches, backoff, close codes, tokens, signals and typing.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  Backoff,
  Roster,
  SeqOrderer,
  TypingTracker,
  batchUnits,
  closeAction,
  diffRosters,
  httpBase,
  refreshDelay,
  signalMessage,
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

// --- big rooms (issue 13) ----------------------------------------------------------------------

const statusEvent = (seq, user, status, previous) =>
  event("", seq, { user_id: user, session_id: `s-${user}`, status, previous_status: previous }).data;

test("a batch applies its events in order, skips what was applied and continues from last_seq", () => {
  const orderer = new SeqOrderer();
  orderer.snapshot(119);
  const signal = { message: { type: "signal.typing", data: { user_id: "bob" } } };
  const { apply, gap } = orderer.pushBatch(120, 161, [{ seq: 125 }, signal, { seq: 140 }, { seq: 161 }]);
  assert.equal(gap, null);
  assert.deepEqual(apply.map((unit) => unit.seq ?? unit.message.type), [125, "signal.typing", 140, 161]);
  assert.deepEqual(orderer.push({ seq: 162 }).apply.map((each) => each.seq), [162]); // no gap
  // Events already applied are skipped; the signals of a stale batch are still delivered.
  const again = orderer.pushBatch(150, 163, [{ seq: 150 }, signal, { seq: 163 }]);
  assert.deepEqual(again.apply.map((unit) => unit.seq ?? "signal"), ["signal", 163]);
  assert.equal(orderer.seq, 163);
  // A first_seq beyond the next one is a gap; its signals still come out.
  assert.deepEqual(orderer.pushBatch(165, 170, [{ seq: 166 }, signal]), {
    apply: [signal],
    gap: { expected: 164, got: 165 },
  });
  // A batch of signals only (no seqs) moves nothing.
  orderer.snapshot(200);
  assert.deepEqual(orderer.pushBatch(null, null, [signal]), { apply: [signal], gap: null });
  assert.equal(orderer.seq, 200);
});

test("a batch before the snapshot waits for it, its signals do not", () => {
  const orderer = new SeqOrderer();
  const signal = { message: { type: "signal.pointer" } };
  assert.deepEqual(orderer.pushBatch(5, 9, [{ seq: 6 }, signal, { seq: 9 }]), { apply: [signal], gap: null });
  orderer.push({ seq: 10 });
  const { apply, gap } = orderer.snapshot(4);
  assert.equal(gap, null);
  assert.deepEqual(apply.map((each) => each.seq), [6, 9, 10]);
  // A held batch that does not follow the snapshot is a gap.
  orderer.restart();
  orderer.pushBatch(8, 9, [{ seq: 9 }]);
  assert.deepEqual(orderer.snapshot(6).gap, { expected: 7, got: 8 });
});

test("batch messages: presence events by their seq, anything else as it is", () => {
  const joined = { type: "presence.user_joined", data: { user_id: "a", seq: 3 } };
  const signal = { type: "signal.typing", data: { user_id: "a" } };
  assert.deepEqual(batchUnits([joined, signal]), [
    { type: joined.type, data: joined.data, seq: 3 },
    { message: signal },
  ]);
  assert.deepEqual(batchUnits(undefined), []);
});

test("crowd counts come from the snapshot and follow each event's previous_status", () => {
  const roster = new Roster();
  roster.reset([alice], { counts: { active: 10, idle: 2, away: 1 }, complete: false, total: 13 });
  assert.equal(roster.total(), 13);
  roster.apply("presence.user_joined", event("", 21, { user_id: "bob", session_id: "s-b" }).data);
  roster.apply("presence.user_idle", statusEvent(22, "zed", "idle", "active"));
  roster.apply("presence.user_away", statusEvent(23, "yan", "away", "idle"));
  roster.apply("presence.user_left", statusEvent(24, "xia", "away", null));
  roster.apply("presence.user_idle", { ...aliceEvent, ...statusEvent(25, "alice", "idle", "active") });
  assert.deepEqual(roster.counts, { active: 9, idle: 3, away: 1 });
  assert.equal(roster.total(), 13);
  // previous_status belongs to the event, not to the user.
  assert.equal("previous_status" in roster.byUser.get("alice"), false);
  assert.equal("previous_status" in roster.byUser.get("zed"), false);
});

test("an unlisted user's cursor or status event lists them, without a join", () => {
  const roster = new Roster();
  roster.reset([alice], { counts: { active: 3, idle: 1, away: 0 }, complete: false });
  const moved = roster.apply("presence.cursor_moved", event("", 21, { user_id: "zed", session_id: "s-z", move_path: "main.5" }).data);
  assert.equal(moved.kind, "cursor");
  assert.equal(moved.previous, undefined);
  assert.equal(moved.user.joined_at, undefined); // unknown: not the event's time
  assert.equal(roster.apply("presence.user_idle", statusEvent(22, "yan", "idle", "active")).kind, "status");
  assert.deepEqual(roster.users().map((user) => user.user_id), ["alice", "yan", "zed"]);
  assert.deepEqual(roster.counts, { active: 2, idle: 2, away: 0 });
});

test("counts neither count twice what a complete snapshot reflects nor need counts from old servers", () => {
  const roster = new Roster();
  roster.reset([alice, { ...alice, user_id: "bob", status: "away" }]);
  assert.deepEqual(roster.counts, { active: 1, idle: 0, away: 1 });
  assert.equal(roster.complete, true);
  roster.apply("presence.user_joined", { ...aliceEvent, seq: 3, timestamp: "t" }); // in the snapshot
  roster.apply("presence.user_left", { user_id: "gone", status: "idle", seq: 4 }); // already gone
  assert.deepEqual(roster.counts, { active: 1, idle: 0, away: 1 });
});

test("a partial snapshot reports no leave for the users it does not list", () => {
  const before = new Map([["alice", alice], ["bob", { ...alice, user_id: "bob" }]]);
  const after = new Map([["alice", alice]]);
  assert.deepEqual(diffRosters(before, after, { leaves: false }), []);
  assert.deepEqual(diffRosters(before, after).map(({ kind }) => kind), ["leave"]);
});

test("a signal message is checked as the node checks it", () => {
  assert.equal(signalMessage("pointer", { square: "e4" }, 1024), '{"type":"signal","name":"pointer","data":{"square":"e4"}}');
  assert.deepEqual(JSON.parse(signalMessage("typing", undefined, 1024)).data, {});
  for (const name of ["", "Typing", "9lives", "a-b", "x".repeat(33), 7])
    assert.throws(() => signalMessage(name, {}, 1024), TypeError, String(name));
  for (const data of [null, [1], "text"]) assert.throws(() => signalMessage("t", data, 1024), TypeError);
  // {"t":"…"} is 8 bytes around the text; "é" is 2 bytes of UTF-8.
  assert.ok(signalMessage("t", { t: "éééé" }, 16));
  assert.throws(() => signalMessage("t", { t: "éééééx" }, 16), RangeError);
});

test("typing lasts 5 s after the last signal, and active false ends it at once", () => {
  const typing = new TypingTracker();
  assert.equal(typing.signal({ user_id: "bob", chapter_id: "ch1" }, 1000), true);
  assert.equal(typing.signal({ user_id: "bob", chapter_id: "ch1" }, 3000), false); // longer, same list
  assert.equal(typing.signal({ user_id: "carol" }, 3500), true);
  assert.deepEqual(typing.users(), [{ user_id: "bob", chapter_id: "ch1" }, { user_id: "carol", chapter_id: null }]);
  assert.equal(typing.nextExpiry(), 8000);
  assert.equal(typing.expire(7999), false);
  assert.equal(typing.expire(8000), true);
  assert.deepEqual(typing.users().map((each) => each.user_id), ["carol"]);
  assert.equal(typing.signal({ user_id: "carol", active: false }, 8100), true);
  assert.equal(typing.nextExpiry(), null);
  assert.equal(typing.signal({ active: true }, 9000), false); // no user_id: ignored
});
