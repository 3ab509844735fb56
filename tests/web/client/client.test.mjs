// PresenceClient against a scripted WebSocket: one socket, snapshot-first, reconnect heartbeat,
// resync on a gap, close-code reactions, cursor throttling, failover between URLs.
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
