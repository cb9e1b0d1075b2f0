// The client end to end against a small in-test server (the `ws` package) that
// sends real v2 frames, or answers as a v1 server does (no subprotocol).
import { test, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket, { WebSocketServer } from "ws";
import { connect, RoomConnection } from "../build/index.js";
import { until } from "./lib.mjs";

const T0 = "2026-01-01T12:00:00.000Z";
const T1 = "2026-01-01T12:00:01.000Z";
const shape = (id, extra = {}) => ({ id, type: "rectangle", x: 0, y: 0, width: 10, height: 10, userId: "alice",
  timestamp: T0, fill: "#3b82f6", stroke: "#1d4ed8", rotation: 0, ...extra });

const servers = [];
after(async () => {
  for (const s of servers) {
    for (const c of s.wss.clients) c.terminate();
    await new Promise((r) => s.wss.close(r));
  }
});

/**
 * A fake server. `v2`: whether it answers the `whiteboard.v2` offer. Every
 * connection is recorded: the offered subprotocols and the messages received.
 */
async function fakeServer({ v2 }) {
  const connections = [];
  const wss = new WebSocketServer({
    host: "127.0.0.1",
    port: 0,
    handleProtocols: (offered) => (v2 && offered.has("whiteboard.v2") ? "whiteboard.v2" : false),
  });
  wss.on("connection", (socket, req) => {
    const conn = { socket, offered: req.headers["sec-websocket-protocol"] ?? null, received: [] };
    socket.on("message", (data) => conn.received.push(JSON.parse(data.toString())));
    connections.push(conn);
  });
  await new Promise((r) => wss.once("listening", r));
  const server = {
    wss,
    connections,
    url: `ws://127.0.0.1:${wss.address().port}/?token=t`,
    /** The newest connection, once there is one. */
    async connection() {
      await until(() => connections.length > 0, "a connection");
      return connections[connections.length - 1];
    },
  };
  servers.push(server);
  return server;
}

const send = (conn, msg) => conn.socket.send(JSON.stringify(msg));

test("v2 server: the client negotiates v2, applies a snapshot then ops, and asks one resync after a gap", async () => {
  const server = await fakeServer({ v2: true });
  const changes = [];
  const client = connect(server.url, { onChange: (s) => changes.push(s) });
  assert.equal(await client.opened, "v2");
  assert.equal(client.fallbacks, 0);
  const conn = await server.connection();
  assert.equal(conn.offered, "whiteboard.v2");

  send(conn, { type: "snapshot", seq: 5, connectedUsers: ["alice"], cursors: [], shapes: [shape("s1")] });
  send(conn, { type: "ops", seq: 6, ops: [
    { op: "join", userId: "bob" },
    { op: "cursor", userId: "bob", x: 3, y: 4, timestamp: T1 },
    { op: "update", id: "s1", set: { x: 50, timestamp: T1 } },
  ] });
  await until(() => client.lastSeq === 6, () => JSON.stringify(client.state));
  assert.deepEqual(client.state, {
    connectedUsers: ["alice", "bob"],
    cursors: [{ userId: "bob", x: 3, y: 4, timestamp: T1 }],
    shapes: [shape("s1", { x: 50, timestamp: T1 })],
  });
  assert.equal(changes.length, 2);
  assert.equal(changes[1], client.state);

  // 7 is lost: 8 is a gap, one resync goes out, 9 is ignored too.
  send(conn, { type: "ops", seq: 8, ops: [{ op: "remove", id: "s1" }] });
  send(conn, { type: "ops", seq: 9, ops: [{ op: "leave", userId: "bob" }] });
  await until(() => conn.received.length === 1, "the resync");
  await new Promise((r) => setTimeout(r, 50)); // a second resync would arrive by now
  assert.deepEqual(conn.received, [{ type: "resync" }]);
  assert.equal(client.stats.resyncs, 1);
  assert.equal(client.state.shapes.length, 1, "nothing after the gap was applied");

  send(conn, { type: "snapshot", seq: 40, connectedUsers: ["alice"], cursors: [], shapes: [] });
  send(conn, { type: "ops", seq: 41, ops: [{ op: "add", shape: shape("s2") }] });
  await until(() => client.lastSeq === 41, () => JSON.stringify(client.state));
  assert.deepEqual(client.state, { connectedUsers: ["alice"], cursors: [], shapes: [shape("s2")] });

  // An op naming an unknown shape: one more resync.
  send(conn, { type: "ops", seq: 42, ops: [{ op: "update", id: "ghost", set: { x: 1, timestamp: T1 } }] });
  await until(() => conn.received.length === 2, "the second resync");
  assert.deepEqual(conn.received[1], { type: "resync" });
  assert.match(client.stats.lastProblem, /update of unknown shape ghost/);
  client.close();
  await client.closed;
});

test("v1 server (answers without the subprotocol): the client falls back to v1 and reads full snapshots", async () => {
  const server = await fakeServer({ v2: false });
  const client = connect(server.url);
  assert.equal(await client.opened, "v1");
  assert.equal(client.protocol, "v1");
  assert.equal(client.fallbacks, 1, "the offer failed the handshake, the second attempt offered nothing");
  await until(() => server.connections.length === 2, "two attempts");
  assert.deepEqual(server.connections.map((c) => c.offered), ["whiteboard.v2", null]);
  const conn = server.connections[1];

  send(conn, { connectedUsers: ["alice"], cursors: [], shapes: [shape("s1")] });
  await until(() => client.state.shapes.length === 1, () => JSON.stringify(client.state));
  // A v2-shaped frame means nothing to a v1 connection.
  send(conn, { type: "ops", seq: 1, ops: [{ op: "remove", id: "s1" }] });
  send(conn, { connectedUsers: ["alice", "bob"], cursors: [], shapes: [shape("s1"), shape("s2")] });
  await until(() => client.state.shapes.length === 2, () => JSON.stringify(client.state));
  assert.deepEqual(client.state, { connectedUsers: ["alice", "bob"], cursors: [], shapes: [shape("s1"), shape("s2")] });
  assert.equal(client.lastSeq, null);
  assert.equal(client.stats.resyncs, 0);
  assert.equal(conn.received.length, 0);
  client.close();
});

test("protocol v1 offers nothing (one attempt)", async () => {
  const server = await fakeServer({ v2: true });
  const client = connect(server.url, { protocol: "v1" });
  assert.equal(await client.opened, "v1");
  assert.equal((await server.connection()).offered, null);
  assert.equal(server.connections.length, 1);
  client.close();
});

test("the send helpers send the v1 client messages, and resync", async () => {
  const server = await fakeServer({ v2: true });
  const closes = [];
  const client = connect(server.url, { onClose: (info) => closes.push(info) });
  await client.opened;
  const conn = await server.connection();
  assert.ok(client.moveCursor(1.5, 2));
  assert.ok(client.createShape({ shapeType: "text", x: 1, y: 2, width: 3, height: 4, text: "t", fill: "#fff" }));
  assert.ok(client.updateShape("s1", { x: 9, rotation: 90 }));
  assert.ok(client.deleteShape("s1"));
  assert.ok(client.resync());
  await until(() => conn.received.length === 5, () => JSON.stringify(conn.received));
  assert.deepEqual(conn.received, [
    { type: "cursor_move", x: 1.5, y: 2 },
    { type: "shape_create", shapeType: "text", x: 1, y: 2, width: 3, height: 4, text: "t", fill: "#fff" },
    { type: "shape_update", shapeId: "s1", x: 9, rotation: 90 },
    { type: "shape_delete", shapeId: "s1" },
    { type: "resync" },
  ]);
  assert.equal(client.stats.sent, 5);
  conn.socket.close(4000, "Replaced by a new connection");
  const info = await client.closed;
  assert.deepEqual(info, { code: 4000, reason: "Replaced by a new connection", wasClean: true });
  assert.deepEqual(client.closeInfo, info);
  assert.equal(client.moveCursor(0, 0), false);
  assert.deepEqual(closes, [info], "onClose is called once");
});

test("an injected WebSocket constructor (the `ws` package) works for v2 and for the v1 fallback", async () => {
  const v2 = await fakeServer({ v2: true });
  const a = connect(v2.url, { WebSocket });
  assert.equal(await a.opened, "v2");
  send(await v2.connection(), { type: "snapshot", seq: 0, connectedUsers: ["a"], cursors: [], shapes: [] });
  await until(() => a.state.connectedUsers.length === 1, "the snapshot");
  a.close();

  const v1 = await fakeServer({ v2: false });
  const b = connect(v1.url, { WebSocket });
  assert.equal(await b.opened, "v1");
  assert.equal(b.fallbacks, 1);
  b.close();
});

test("without a global WebSocket and without the option, connect says what to do", () => {
  const saved = globalThis.WebSocket;
  try {
    delete globalThis.WebSocket;
    assert.throws(() => connect("ws://127.0.0.1:1/"), /pass options.WebSocket/);
  } finally {
    globalThis.WebSocket = saved;
  }
  assert.equal(typeof RoomConnection, "function");
});

test("subscribe and getState fit React's useSyncExternalStore; unsubscribe stops the calls", async () => {
  const server = await fakeServer({ v2: true });
  const client = connect(server.url);
  await client.opened;
  const conn = await server.connection();
  const seen = [];
  const unsubscribe = client.subscribe((s) => seen.push(s));
  const before = client.getState();
  send(conn, { type: "snapshot", seq: 0, connectedUsers: ["a"], cursors: [], shapes: [] });
  await until(() => seen.length === 1, "a change");
  assert.notEqual(client.getState(), before);
  assert.equal(seen[0], client.getState());
  unsubscribe();
  send(conn, { type: "ops", seq: 1, ops: [{ op: "join", userId: "b" }] });
  await until(() => client.lastSeq === 1, "the batch");
  assert.equal(seen.length, 1);
  client.close();
});

test("close() with a code a browser refuses closes anyway, with 1000", async () => {
  // The global WebSocket (undici) follows the browser's rules: close(1001) throws.
  const server = await fakeServer({ v2: true });
  for (const [code, expected] of [[1001, 1000], [2999, 1000], [5000, 1000], [4000.5, 1000], [3001, 3001], [4999, 4999], [undefined, 1000]]) {
    const client = connect(server.url);
    await client.opened;
    const conn = server.connections[server.connections.length - 1];
    const seen = new Promise((resolve) => conn.socket.once("close", (c) => resolve(c)));
    client.close(code, "bye");
    const info = await client.closed;
    assert.equal(info.code, expected, `close(${code})`);
    assert.equal(await seen, expected, `close(${code}): the server saw it`);
  }
});

test("a change listener that throws skips no other listener and does not stop the client", async () => {
  const server = await fakeServer({ v2: true });
  const errors = [];
  const seen = [];
  const client = connect(server.url, {
    onChange: () => { throw new Error("listener bug"); },
    onError: (e) => errors.push(e.message),
  });
  client.subscribe((s) => seen.push(s));
  await client.opened;
  const conn = await server.connection();
  send(conn, { type: "snapshot", seq: 0, connectedUsers: ["a"], cursors: [], shapes: [] });
  send(conn, { type: "ops", seq: 1, ops: [{ op: "join", userId: "b" }] });
  await until(() => client.lastSeq === 1, "both frames");
  assert.equal(seen.length, 2, "the listener after the throwing one saw both changes");
  assert.equal(seen[1], client.state);
  assert.deepEqual(errors, ["listener bug", "listener bug"]);
  client.close();
  await client.closed;

  // Without onError: console.error, and the same isolation.
  const logged = [];
  const saved = console.error;
  console.error = (...args) => logged.push(args);
  try {
    const quiet = connect(server.url, { onChange: () => { throw new Error("again"); } });
    const after = [];
    quiet.subscribe((s) => after.push(s));
    await quiet.opened;
    send(await server.connection(), { type: "snapshot", seq: 0, connectedUsers: [], cursors: [], shapes: [] });
    await until(() => after.length === 1, "the change");
    assert.equal(logged.length, 1);
    assert.equal(logged[0][1].message, "again");
    quiet.close();
  } finally {
    console.error = saved;
  }
});

test("a resync that brings no snapshot is asked again every resyncRetryMs until a snapshot arrives", async () => {
  const server = await fakeServer({ v2: true });
  const client = connect(server.url, { resyncRetryMs: 100 });
  await client.opened;
  const conn = await server.connection();
  send(conn, { type: "snapshot", seq: 1, connectedUsers: ["a"], cursors: [], shapes: [] });
  await until(() => client.lastSeq === 1, "the snapshot");
  const t0 = Date.now();
  send(conn, { type: "ops", seq: 3, ops: [] }); // 2 is lost: a gap
  await until(() => conn.received.length === 1, "the first resync");
  // The fake "loses" it: no snapshot. The client asks again after 100 ms.
  await until(() => conn.received.length === 2, "the second resync", 2000);
  assert.ok(Date.now() - t0 >= 90, `the second resync came after ${Date.now() - t0} ms`);
  await new Promise((r) => setTimeout(r, 250));
  const asked = conn.received.length;
  assert.ok(asked >= 3 && asked <= 5, `${asked} resyncs in ~350 ms at most one per 100 ms`);
  assert.ok(conn.received.every((m) => m.type === "resync"));
  assert.equal(client.stats.resyncs, asked);
  // Ops are still ignored; a snapshot ends the retries.
  send(conn, { type: "ops", seq: 4, ops: [{ op: "join", userId: "b" }] });
  send(conn, { type: "snapshot", seq: 10, connectedUsers: ["a", "c"], cursors: [], shapes: [] });
  await until(() => client.lastSeq === 10, "the answer");
  const final = conn.received.length;
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(conn.received.length, final, "no resync after the snapshot");
  assert.deepEqual(client.state.connectedUsers, ["a", "c"]);
  client.close();
  await client.closed;
});

test("closing while a resync is pending stops the retries", async () => {
  const server = await fakeServer({ v2: true });
  const client = connect(server.url, { resyncRetryMs: 50 });
  await client.opened;
  const conn = await server.connection();
  send(conn, { type: "ops", seq: 3, ops: [] }); // ops before any snapshot: a resync
  await until(() => conn.received.length === 1, "the resync");
  client.close();
  await client.closed;
  const sent = client.stats.sent;
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(client.stats.sent, sent);
});

/** A v1 fake that turns away the connections numbered in `duplicates` (1-based) with 1008 Duplicate user, right after they open. */
async function duplicateServer(duplicates) {
  const server = await fakeServer({ v2: false });
  let n = 0;
  server.wss.on("connection", (socket) => {
    n++;
    if (duplicates.includes(n)) socket.close(1008, "Duplicate user");
  });
  return server;
}

test("after a fallback, a 1008 Duplicate user at once gets one more v1 attempt, fallbackRetryMs later", async () => {
  const server = await duplicateServer([2]); // 1: the v2 offer (fails), 2: v1, turned away
  const closes = [];
  const client = connect(server.url, { fallbackRetryMs: 150, onClose: (i) => closes.push(i) });
  assert.equal(await client.opened, "v1");
  const t0 = Date.now();
  await until(() => server.connections.length === 3, "the retry");
  assert.ok(Date.now() - t0 >= 120, `the retry came ${Date.now() - t0} ms after the open, not ~150`);
  assert.deepEqual(server.connections.map((c) => c.offered), ["whiteboard.v2", null, null]);
  send(server.connections[2], { connectedUsers: ["alice"], cursors: [], shapes: [] });
  await until(() => client.state.connectedUsers.length === 1, () => JSON.stringify(client.state));
  assert.equal(client.duplicateRetries, 1);
  assert.equal(client.closeInfo, null);
  assert.ok(client.moveCursor(1, 2));
  await until(() => server.connections[2].received.length === 1, "the cursor move on the new connection");
  assert.deepEqual(closes, []);
  client.close();
  await client.closed;
  assert.equal(closes.length, 1);
});

test("a real duplicate after a fallback closes with 1008 after the one retry; without a fallback, at once", async () => {
  const twice = await duplicateServer([2, 3]);
  const closes = [];
  const a = connect(twice.url, { fallbackRetryMs: 50, onClose: (i) => closes.push(i) });
  const info = await a.closed;
  assert.equal(info.code, 1008);
  assert.equal(info.reason, "Duplicate user");
  assert.equal(twice.connections.length, 3, "one retry, not more");
  assert.equal(a.duplicateRetries, 1);
  assert.deepEqual(closes, [info]);

  const direct = await duplicateServer([1]);
  const b = connect(direct.url, { protocol: "v1", fallbackRetryMs: 50 });
  assert.equal((await b.closed).code, 1008);
  await new Promise((r) => setTimeout(r, 150));
  assert.equal(direct.connections.length, 1, "no fallback, no retry");
  assert.equal(b.duplicateRetries, 0);
});

test("close() while the retry after a duplicate waits ends the connection at once", async () => {
  const server = await duplicateServer([2]);
  const client = connect(server.url, { fallbackRetryMs: 300 });
  await client.opened;
  await until(() => client.duplicateRetries === 1, "the duplicate");
  client.close(4321, "leaving");
  // The app's close ends the connection with the app's code and reason, in any
  // state (here between two sockets, after a server's 1008).
  assert.deepEqual(await client.closed, { code: 4321, reason: "leaving", wasClean: true });
  await new Promise((r) => setTimeout(r, 400));
  assert.equal(server.connections.length, 2, "no attempt after close()");
});
