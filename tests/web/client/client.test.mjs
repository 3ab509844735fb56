// PresenceClient against a scripted WebSocket: one socket, snapshot-first, reconnect heartbeat,
// resync on a gap, close-code reactions, cursor throttling, failover between URLs; and the
// big-rooms protocol: batches, crowd counts, signals, typing and pointers.
import assert from "node:assert/strict";
import { test } from "node:test";

import { PresenceClient } from "../../../presence_svc/web/client/presence.js";

class FakeSocket {
  static made = [];

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.made.push(this);
  }

  send(text) {
    this.sent.push(JSON.parse(text));
  }

  close(code) {
    this.closedWith = code;
    this.readyState = 3;
  }

  // What a node does: accept, send connected and a snapshot, events, close.
  accept(user = "alice", users = [], seq = 0) {
    this.readyState = 1;
    this.receive({ type: "connected", data: { user_id: user, connection_id: "c", study_id: "st" } });
    if (users !== null) this.receive({ type: "presence.snapshot", data: { study_id: "st", users, total: users.length, seq } });
  }

  receive(message) {
    this.onmessage({ data: JSON.stringify(message) });
  }

  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose({ code, reason });
  }
}

const until = async (check, what) => {
  const deadline = Date.now() + 2000;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
};

function client(options = {}) {
  FakeSocket.made = [];
  return new PresenceClient({
    url: "http://a.example",
    studyId: "st",
    token: "t0",
    WebSocket: FakeSocket,
    backoffBase: 5,
    backoffCap: 20,
    heartbeatInterval: 60000,
    ...options,
  });
}

const joined = (user, seq) => ({
  type: "presence.user_joined",
  data: { user_id: user, session_id: `s-${user}`, status: "active", chapter_id: null, move_path: null, timestamp: "t", seq },
});

test("connect resolves after the first snapshot, with the events held before it applied", async () => {
  const presence = client();
  const connecting = presence.connect();
  assert.equal(presence.connect(), connecting); // one connect, one socket
  await until(() => FakeSocket.made.length === 1, "the socket");
  const ws = FakeSocket.made[0];
  assert.equal(ws.url, "ws://a.example/ws/presence?study_id=st&token=t0");
  ws.readyState = 1;
  ws.receive({ type: "connected", data: { user_id: "alice", connection_id: "c" } });
  ws.receive(joined("bob", 3)); // before the snapshot: held
  ws.receive(joined("carol", 2)); // at or below the snapshot's seq: dropped
  ws.receive({ type: "presence.snapshot", data: { users: [{ user_id: "carol", status: "idle", joined_at: "0" }], seq: 2 } });
  assert.equal(await connecting, presence);
  assert.equal(presence.state, "open");
  assert.deepEqual(presence.users().map((user) => [user.user_id, user.status]), [["carol", "idle"], ["bob", "active"]]);
  assert.equal(FakeSocket.made.length, 1);
  presence.close();
  assert.equal(presence.state, "closed");
  assert.equal(ws.closedWith, 1000);
});

test("a reconnect heartbeats at once with the last cursor, and failover takes the next URL", async () => {
  const presence = client({ url: ["http://a.example", "https://b.example"] });
  const connecting = presence.connect();
  await until(() => FakeSocket.made.length === 1, "the socket");
  FakeSocket.made[0].accept();
  await connecting;
  presence.setCursor({ chapterId: "ch1", movePath: "main.4" });
  assert.deepEqual(FakeSocket.made[0].sent, [{ type: "heartbeat", chapter_id: "ch1", move_path: "main.4" }]);
  const states = [];
  presence.on("state", (state) => states.push(state));
  FakeSocket.made[0].serverClose(1006);
  await until(() => FakeSocket.made.length === 2, "the second socket");
  const second = FakeSocket.made[1];
  assert.ok(second.url.startsWith("wss://b.example/ws/presence?"), second.url);
  second.accept("alice", null);
  assert.deepEqual(second.sent, [{ type: "heartbeat", chapter_id: "ch1", move_path: "main.4" }]);
  assert.deepEqual(states, ["reconnecting"]);
  presence.close();
});

test("a seq gap asks for a fresh snapshot on a new socket instead of guessing", async () => {
  const presence = client();
  const gaps = [];
  presence.on("resync", (gap) => gaps.push(gap));
  const connecting = presence.connect();
  await until(() => FakeSocket.made.length === 1, "the socket");
  FakeSocket.made[0].accept("alice", [], 5);
  await connecting;
  FakeSocket.made[0].receive(joined("bob", 6));
  FakeSocket.made[0].receive(joined("carol", 8));
  assert.deepEqual(gaps, [{ expected: 7, got: 8 }]);
  assert.equal(FakeSocket.made[0].closedWith, 4000);
  await until(() => FakeSocket.made.length === 2, "the resync socket");
  assert.deepEqual(presence.users().map((user) => user.user_id), ["bob"]); // carol not guessed
  const left = [];
  presence.on("leave", (user) => left.push(user.user_id));
  FakeSocket.made[1].accept("alice", [{ user_id: "carol", status: "active", joined_at: "1" }], 8);
  assert.deepEqual(presence.users().map((user) => user.user_id), ["carol"]);
  assert.deepEqual(left, ["bob"]);
  assert.equal(presence.resyncs, 1);
  presence.close();
});

test("4403 and 4400 stop the client with an error; connect rejects", async () => {
  for (const code of [4403, 4400]) {
    const presence = client();
    const errors = [];
    presence.on("error", (error) => errors.push(error));
    const connecting = presence.connect();
    await until(() => FakeSocket.made.length === 1, "the socket");
    FakeSocket.made[0].serverClose(code, "no");
    await assert.rejects(connecting, { closeCode: code });
    assert.equal(presence.state, "closed");
    assert.equal(errors.length, 1);
    assert.equal(errors[0].fatal, true);
    await new Promise((resolve) => setTimeout(resolve, 30));
    assert.equal(FakeSocket.made.length, 1, "no reconnect");
  }
});

test("4401 gets a fresh token from getToken, then reconnects with it", async () => {
  let issued = 0;
  const presence = client({ token: undefined, getToken: async () => `tok${++issued}` });
  const connecting = presence.connect();
  await until(() => FakeSocket.made.length === 1, "the socket");
  assert.ok(FakeSocket.made[0].url.endsWith("token=tok1"));
  FakeSocket.made[0].serverClose(4401, "token expired");
  await until(() => FakeSocket.made.length === 2, "the second socket");
  assert.ok(FakeSocket.made[1].url.endsWith("token=tok2"), FakeSocket.made[1].url);
  FakeSocket.made[1].accept();
  await connecting;
  presence.close();
});

test("4401 with a fixed token cannot succeed again: stop", async () => {
  const presence = client();
  const connecting = presence.connect();
  await until(() => FakeSocket.made.length === 1, "the socket");
  FakeSocket.made[0].serverClose(4401, "bad token");
  await assert.rejects(connecting, { code: "unauthorized" });
});

test("cursor updates are throttled: the first at once, then the latest of the window", async () => {
  const presence = client({ cursorThrottle: 40 });
  const connecting = presence.connect();
  await until(() => FakeSocket.made.length === 1, "the socket");
  FakeSocket.made[0].accept();
  await connecting;
  for (let ply = 1; ply <= 5; ply += 1) presence.setCursor({ chapterId: "ch1", movePath: `main.${ply}` });
  assert.equal(FakeSocket.made[0].sent.length, 1);
  await until(() => FakeSocket.made[0].sent.length === 2, "the trailing update");
  assert.deepEqual(FakeSocket.made[0].sent.map((message) => message.move_path), ["main.1", "main.5"]);
  presence.close();
});

test("the token is refreshed over the socket before it expires", async () => {
  const exp = Math.floor(Date.now() / 1000) + 2; // 2 s left: refresh about 1 s from now
  const jwt = (n) => `h.${Buffer.from(JSON.stringify({ exp: exp + n })).toString("base64url")}.s${n}`;
  let issued = 0;
  const presence = client({ token: undefined, getToken: async () => jwt(issued++) });
  const connecting = presence.connect();
  await until(() => FakeSocket.made.length === 1, "the socket");
  FakeSocket.made[0].accept();
  await connecting;
  await until(() => FakeSocket.made[0].sent.some((message) => message.type === "refresh"), "a refresh");
  assert.deepEqual(FakeSocket.made[0].sent.at(-1), { type: "refresh", token: jwt(1) });
  presence.close();
});

// --- big rooms (issue 13) ----------------------------------------------------------------------

const flush = () => new Promise((resolve) => setImmediate(resolve));

async function opened(options = {}, snapshot = { users: [], seq: 0 }) {
  const presence = client(options);
  const connecting = presence.connect();
  await flush();
  const ws = FakeSocket.made[0];
  ws.readyState = 1;
  ws.receive({ type: "connected", data: { user_id: "me", connection_id: "c", study_id: "st" } });
  ws.receive({ type: "presence.snapshot", data: { study_id: "st", ...snapshot } });
  await connecting;
  return { presence, ws };
}

function record(presence, types) {
  const seen = [];
  for (const type of types) presence.on(type, (...args) => seen.push([type, ...args]));
  return seen;
}

const presenceEvent = (kind, seq, user, status = "active", previous = null) => ({
  type: `presence.${kind}`,
  data: { user_id: user, session_id: `s-${user}`, status, previous_status: previous, chapter_id: null, move_path: null, timestamp: "t", seq },
});
const signalOf = (name, user, data = {}) => ({ type: `signal.${name}`, data: { ...data, user_id: user } });

test("a batch is reported as the messages it carries, then events continue from last_seq", async () => {
  const users = [{ user_id: "alice", status: "active", joined_at: "0" }, { user_id: "bob", status: "active", joined_at: "1" }];
  const counts = { active: 150, idle: 20, away: 30 };
  const { presence, ws } = await opened({}, { users, total: 200, counts, seq: 119, complete: false });
  assert.deepEqual([presence.total(), presence.complete()], [200, false]);
  const seen = record(presence, ["join", "status", "leave", "signal", "signal.typing", "event", "change"]);
  ws.receive({
    type: "presence.batch",
    data: {
      first_seq: 120,
      last_seq: 161,
      events: [
        presenceEvent("user_joined", 121, "carol"),
        signalOf("typing", "alice", { chapter_id: "ch1" }),
        presenceEvent("user_idle", 150, "zed", "idle", "active"),
        { type: "study.renamed", data: { name: "x" } },
        presenceEvent("user_left", 161, "bob"),
      ],
    },
  });
  assert.deepEqual(
    seen.map(([type, detail]) => [type, typeof detail === "string" ? detail : detail?.user_id ?? detail?.type ?? detail?.length]),
    [
      ["join", "carol"],
      ["signal", "typing"],
      ["signal.typing", "alice"],
      ["status", "zed"],
      ["event", "study.renamed"],
      ["leave", "bob"],
      ["change", 3], // once for the whole batch: alice, carol and zed listed
    ],
  );
  const [, name, data, message] = seen[1];
  assert.deepEqual([name, data, message.type], ["typing", { chapter_id: "ch1", user_id: "alice" }, "signal.typing"]);
  assert.deepEqual(presence.counts(), { active: 149, idle: 21, away: 30 });
  assert.equal(presence.users().some((user) => "previous_status" in user), false);
  ws.receive(presenceEvent("user_away", 162, "alice", "away", "active"));
  assert.deepEqual(presence.counts(), { active: 148, idle: 21, away: 31 });
  assert.equal(presence.total(), 200);
  assert.equal(presence.resyncs, 0);
  presence.close();
});

test("a batch after a gap resyncs, delivering its signals", async () => {
  const { presence, ws } = await opened({}, { users: [], seq: 10 });
  const gaps = record(presence, ["resync", "signal"]);
  ws.receive({
    type: "presence.batch",
    data: { first_seq: 12, last_seq: 12, events: [presenceEvent("user_joined", 12, "carol"), signalOf("pointer", "dan", { square: "e4" })] },
  });
  assert.deepEqual(gaps.map(([type]) => type), ["signal", "resync"]);
  assert.deepEqual(gaps[1][1], { expected: 11, got: 12 });
  assert.equal(ws.closedWith, 4000);
  assert.deepEqual(presence.users(), []);
  presence.close();
});

test("sendSignal checks the signal, sends it while connected and is false otherwise", async () => {
  const presence = client();
  assert.equal(presence.sendSignal("typing"), false); // not connected: nothing queued
  assert.throws(() => presence.sendSignal("Typing"), TypeError);
  assert.throws(() => presence.sendSignal("note", { text: "x".repeat(2000) }), RangeError);
  const connecting = presence.connect();
  await flush();
  const ws = FakeSocket.made[0];
  ws.accept("me", []);
  await connecting;
  assert.equal(presence.sendSignal("note", { text: "hi" }), true);
  assert.deepEqual(ws.sent.at(-1), { type: "signal", name: "note", data: { text: "hi" } });
  ws.serverClose(1006);
  assert.equal(presence.sendSignal("note"), false);
  assert.equal(ws.sent.filter((message) => message.type === "signal").length, 1);
  presence.close();
});

test("typing: sent at most every 2 s; others' typing expires 5 s after their last signal", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"], now: 1_000_000 });
  const { presence, ws } = await opened();
  presence.setCursor({ chapterId: "ch1" });
  const typingSent = () => ws.sent.filter((message) => message.type === "signal");
  assert.equal(presence.typing(), true);
  t.mock.timers.tick(1999);
  assert.equal(presence.typing(), false);
  t.mock.timers.tick(1);
  assert.equal(presence.typing(), true);
  assert.deepEqual(typingSent().map((message) => message.data), [{ chapter_id: "ch1" }, { chapter_id: "ch1" }]);
  assert.equal(presence.stopTyping(), true);
  assert.deepEqual(typingSent().at(-1), { type: "signal", name: "typing", data: { active: false } });

  const changes = [];
  presence.on("typing", (users) => changes.push(users.map((user) => user.user_id)));
  ws.receive(signalOf("typing", "bob", { chapter_id: "ch1" }));
  ws.receive(signalOf("typing", "me")); // this user's other tab: not someone else typing
  assert.deepEqual(presence.typingUsers(), [{ user_id: "bob", chapter_id: "ch1" }]);
  t.mock.timers.tick(3000);
  ws.receive(signalOf("typing", "bob", { chapter_id: "ch1" })); // still typing: 5 s from now
  ws.receive(signalOf("typing", "carol"));
  t.mock.timers.tick(4999);
  assert.deepEqual(presence.typingUsers().map((user) => user.user_id), ["bob", "carol"]);
  t.mock.timers.tick(1);
  assert.deepEqual(presence.typingUsers(), []);
  assert.deepEqual(changes, [["bob"], ["bob", "carol"], []]);
  ws.receive(signalOf("typing", "dan"));
  ws.receive(signalOf("typing", "dan", { active: false }));
  assert.deepEqual(changes.slice(3), [["dan"], []]);
  presence.close();
});

test("pointTo is throttled to the signal rate; pointers() keeps each user's latest until they leave", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"], now: 1_000_000 });
  const { presence, ws } = await opened({ signalRate: 10 });
  for (const square of ["e2", "e3", "e4"]) presence.pointTo({ chapter_id: "ch1", square, move_path: "main.3" });
  const pointers = () => ws.sent.filter((message) => message.name === "pointer").map((message) => message.data.square);
  assert.deepEqual(pointers(), ["e2"]);
  t.mock.timers.tick(99);
  assert.deepEqual(pointers(), ["e2"]);
  t.mock.timers.tick(1);
  assert.deepEqual(pointers(), ["e2", "e4"]); // the latest of the window
  assert.deepEqual(ws.sent.at(-1).data, { chapter_id: "ch1", square: "e4", move_path: "main.3" });
  assert.throws(() => presence.pointTo({ chapter_id: "ch1", square: "i9" }), TypeError);

  const seen = record(presence, ["pointers"]);
  ws.receive(presenceEvent("user_joined", 1, "bob"));
  ws.receive(signalOf("pointer", "bob", { chapter_id: "ch1", square: "d4" }));
  ws.receive(signalOf("pointer", "bob", { chapter_id: "ch1", square: "d5", move_path: "main.2" }));
  ws.receive(signalOf("pointer", "carol", { chapter_id: "ch2", square: "a1" }));
  assert.deepEqual(presence.pointers(), [
    { user_id: "bob", chapter_id: "ch1", square: "d5", move_path: "main.2" },
    { user_id: "carol", chapter_id: "ch2", square: "a1", move_path: null },
  ]);
  ws.receive(signalOf("pointer", "carol", { chapter_id: "ch2", square: null })); // off the board
  ws.receive(presenceEvent("user_left", 2, "bob"));
  assert.deepEqual(presence.pointers(), []);
  assert.equal(seen.length, 5);
  presence.close();
});
