// Reconnecting, the connect timeout, and the closes that mean "don't come
// back", with the drop-in `SessionClient` (over `RoomConnection`): against a
// Node-like v1 server that the test closes at will, a raw TCP server that never
// answers, and the real server stopped with SIGTERM and started again on the
// same port and data dir.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { SessionClient } from "../build/index.js";
import { startServer, startV1Server, token, until } from "./lib.mjs";

const cleanup = [];
after(async () => {
  for (const f of cleanup.reverse()) await f();
});

const FAST = { initialDelayMs: 20, maxDelayMs: 100 };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A Session.tsx-style session that records snapshots, closes and status changes. */
async function session(host, userId, roomId, options = {}) {
  const client = SessionClient.create(host, { reconnect: FAST, ...options });
  const seen = { client, snapshots: [], closes: 0, statuses: [] };
  client.onMessage((snapshot) => seen.snapshots.push(snapshot));
  client.onClose(() => seen.closes++);
  client.onStatus((status) => seen.statuses.push(status));
  cleanup.push(() => client.close());
  await client.connect(token({ userId, roomId, host }), 45000);
  return seen;
}

const last = (s) => s.snapshots[s.snapshots.length - 1];

async function nodeLikeServer() {
  const server = await startV1Server();
  cleanup.push(() => server.stop());
  return server;
}

test("1001, 1011, 1012 and 1013 are followed by a new connection; its first snapshot is delivered, onClose is not called, and what was sent meanwhile goes out in order", async () => {
  const server = await nodeLikeServer();
  const alice = await session(server.host, "alice", "come-back");
  await until(() => last(alice)?.connectedUsers.length === 1, "the first snapshot");
  for (const [i, code] of [1001, 1011, 1012, 1013].entries()) {
    const connections = server.offered.length;
    server.closeAll(code, "going");
    await until(() => alice.client.status === "reconnecting", `reconnecting after ${code}`);
    // While reconnecting: shape ops queue in order, only the newest cursor is kept.
    assert.equal(alice.client.sendShapeCreate("rectangle", i, 0, 10, 10), true);
    assert.equal(alice.client.sendCursorMove(1, 1), true);
    assert.equal(alice.client.sendCursorMove(i, 7), true);
    await until(() => last(alice).shapes.length === i + 1 && last(alice).cursors.length === 1, () => JSON.stringify(last(alice)));
    assert.equal(server.offered.length, connections + 1, `one new connection after ${code}`);
    assert.deepEqual(last(alice).shapes.map((s) => s.x), [...Array(i + 1).keys()], "shape ops in order");
    assert.deepEqual(last(alice).cursors.map(({ x, y }) => [x, y]), [[i, 7]]);
    assert.equal(alice.client.status, "open");
  }
  assert.equal(alice.closes, 0);
  assert.equal(alice.client.room.stats.reconnects, 4);
  assert.deepEqual(alice.statuses.filter((s) => s === "reconnecting").length, 4);
});

test("4000, 1008, 4001 and 4999 are final: onClose once, no new connection, sends refused", async () => {
  const server = await nodeLikeServer();
  for (const code of [4000, 1008, 4001, 4999]) {
    const user = await session(server.host, `user${code}`, `final-${code}`);
    const connections = server.offered.length;
    server.closeAll(code, "no");
    await until(() => user.closes === 1, `onClose after ${code}`);
    await sleep(300); // FAST would have tried three times by now
    assert.equal(server.offered.length, connections, `no reconnect after ${code}`);
    assert.equal(user.closes, 1);
    assert.equal(user.client.status, "closed");
    assert.ok(!user.statuses.includes("reconnecting"));
    assert.equal(user.client.sendCursorMove(1, 1), false);
  }
});

test("a lost network (the server gone, 1006) reconnects until the bound, then onClose once; nothing is queued after", async () => {
  const server = await nodeLikeServer();
  const alice = await session(server.host, "alice", "gone", { reconnect: { ...FAST, giveUpAfterMs: 600 } });
  await until(() => last(alice)?.connectedUsers.length === 1, "the first snapshot");
  const startedAt = Date.now();
  await server.stop();
  await until(() => alice.client.status === "reconnecting", "reconnecting");
  assert.equal(alice.client.sendShapeCreate("oval", 1, 1, 1, 1), true, "queued while reconnecting");
  await until(() => alice.closes === 1, "giving up", 5000);
  const gaveUpAfter = Date.now() - startedAt;
  assert.ok(gaveUpAfter >= 500 && gaveUpAfter < 2000, `gave up after ${gaveUpAfter} ms (bound 600 ms)`);
  assert.equal(alice.client.status, "closed");
  assert.equal(alice.client.sendShapeCreate("oval", 1, 1, 1, 1), false);
  await sleep(200);
  assert.equal(alice.closes, 1);
});

test("the first attempt reuses the host; when it fails, resolve() gives the room's new server and a token, and the session moves there", async () => {
  const first = await nodeLikeServer();
  const second = await nodeLikeServer();
  const asked = [];
  const alice = await session(first.host, "alice", "moved", {
    resolve: () => {
      asked.push(Date.now());
      return { host: second.host, token: token({ userId: "alice", roomId: "moved", host: second.host }) };
    },
  });
  await until(() => last(alice)?.connectedUsers.length === 1, "the first snapshot");
  first.closeAll(1001, "drain");
  await first.stop();
  await until(() => second.offered.length === 1 && alice.client.status === "open", "the new server", 5000);
  assert.ok(asked.length >= 1, "resolve() was asked");
  assert.equal(alice.client.host, second.host);
  alice.client.sendShapeCreate("line", 1, 2, 3, 4);
  await until(() => last(alice).shapes.length === 1, "a shape on the new server");
  assert.equal(alice.closes, 0);
});

test("the give-up bound holds while resolve() hangs, and against a server that opens and never sends a frame", async () => {
  const server = await nodeLikeServer();
  const hanging = await session(server.host, "alice", "hang", {
    reconnect: { ...FAST, giveUpAfterMs: 500 },
    resolve: () => new Promise(() => {}),
  });
  const silent = await session(server.host, "bob", "silent", { reconnect: { ...FAST, giveUpAfterMs: 500, attemptTimeoutMs: 5000 } });
  await until(() => last(hanging)?.connectedUsers.length === 1 && last(silent)?.connectedUsers.length === 1, "both in");
  // From now on the server opens sockets and says nothing; the first reuse of
  // the URL fails, then alice's resolve() never answers.
  server.intercept = () => true;
  const startedAt = Date.now();
  server.closeAll(1001);
  await until(() => silent.client.status === "reconnecting", "reconnecting");
  assert.equal(silent.client.sendShapeCreate("oval", 1, 1, 1, 1), true, "queued");
  await until(() => hanging.closes === 1 && silent.closes === 1, "both giving up", 3000);
  const took = Date.now() - startedAt;
  assert.ok(took < 1500, `gave up after ${took} ms (bound 500 ms)`);
  assert.equal(silent.client.room.stats.sent, 0, "nothing was written into the silent socket");
  assert.equal(silent.client.room.unsent.length, 1, "the queued shape is kept as unsent");
});

test("a socket that opens and closes before its first frame takes nothing queued with it: the shape arrives on the next one", async () => {
  const server = await nodeLikeServer();
  const alice = await session(server.host, "alice", "unavailable");
  await until(() => last(alice)?.connectedUsers.length === 1, "the first snapshot");
  let refused = 0;
  server.intercept = (socket) => {
    if (refused >= 2) return false;
    refused++;
    socket.close(1011, "Room unavailable");
    return true;
  };
  server.closeAll(1001);
  await until(() => alice.client.status === "reconnecting", "reconnecting");
  assert.equal(alice.client.sendShapeCreate("rectangle", 7, 7, 7, 7), true);
  await until(() => last(alice).shapes.length === 1, () => JSON.stringify(last(alice)));
  assert.equal(refused, 2);
  assert.equal(alice.closes, 0);
});

test("while reconnecting, a drag of two shapes at once waits as one update per shape; a later update does not erase a field with undefined", async () => {
  const server = await nodeLikeServer();
  const alice = await session(server.host, "alice", "two-drags");
  alice.client.sendShapeCreate("text", 0, 0, 10, 10, { text: "a" });
  alice.client.sendShapeCreate("oval", 0, 0, 10, 10);
  await until(() => last(alice)?.shapes.length === 2, "two shapes");
  const [a, b] = last(alice).shapes;
  server.closeAll(1012);
  await until(() => alice.client.status === "reconnecting", "reconnecting");
  for (let i = 1; i <= 8640; i++) { // 60 s of a 144 Hz drag of both
    assert.equal(alice.client.sendShapeUpdate(a.id, { x: i, y: i }), true);
    assert.equal(alice.client.sendShapeUpdate(b.id, { x: -i, y: -i }), true);
    alice.client.sendCursorMove(i, i);
  }
  alice.client.sendShapeUpdate(a.id, { text: "edited" });
  alice.client.sendShapeUpdate(a.id, { text: undefined, rotation: 5 });
  await until(() => alice.client.status === "open" && last(alice).shapes[0].rotation === 5, () => JSON.stringify(last(alice)));
  assert.deepEqual(last(alice).shapes.map(({ x, y, text, rotation }) => ({ x, y, text, rotation })), [
    { x: 8640, y: 8640, text: "edited", rotation: 5 },
    { x: -8640, y: -8640, text: undefined, rotation: 0 },
  ]);
  assert.equal(alice.client.room.stats.queueFull, 0);
});

test("a room that drops every socket right after its first frame is not hammered: the backoff goes on growing", async () => {
  const server = await nodeLikeServer();
  const alice = await session(server.host, "alice", "flap", { reconnect: { initialDelayMs: 50, maxDelayMs: 400 } });
  await until(() => last(alice)?.connectedUsers.length === 1, "the first snapshot");
  server.intercept = (socket) => {
    socket.send(JSON.stringify({ connectedUsers: ["alice"], cursors: [], shapes: [] }));
    setTimeout(() => socket.terminate(), 5);
    return true;
  };
  const before = server.offered.length;
  server.closeAll(1001);
  await sleep(3000);
  const connections = server.offered.length - before;
  // Without the carried backoff: one connection every 25-50 ms (60-120).
  assert.ok(connections >= 3 && connections <= 14, `${connections} connections in 3 s`);
  assert.equal(alice.closes, 0, "each came back: not given up");
});

test("an onClose that throws goes to onError; what a connection left unsent when it gave up goes out with the next client for the same room and user", async () => {
  const server = await nodeLikeServer();
  const errors = [];
  const host = server.host;
  const first = SessionClient.create(host, { reconnect: { ...FAST, giveUpAfterMs: 300 } });
  first.onClose(() => {
    throw new Error("an app bug");
  });
  first.room; // null before connect
  await first.connect(token({ userId: "alice", roomId: "leftover", host }), 5000);
  first.room.subscribe(() => {});
  await until(() => first.room.state.connectedUsers.length === 1, "in");
  const originalError = console.error;
  console.error = (...args) => errors.push(args.map(String).join(" "));
  try {
    server.intercept = () => true; // silent: the room never comes back
    server.closeAll(1001);
    await until(() => first.status === "reconnecting", "reconnecting");
    assert.equal(first.sendShapeCreate("arrow", 3, 3, 3, 3), true);
    await until(() => first.status === "closed", "giving up");
  } finally {
    console.error = originalError;
  }
  assert.match(errors.join("\n"), /an app bug/);
  // The app's Reconnect: a new client, same room and user.
  server.intercept = null;
  const second = await session(host, "alice", "leftover");
  await until(() => last(second)?.shapes.length === 1, () => JSON.stringify(last(second)));
  assert.equal(last(second).shapes[0].type, "arrow");
});

test("reconnecting to a server that is down dials one socket per attempt (no v1 fallback against a server that spoke v2)", async () => {
  const server = await startServer();
  cleanup.push(() => server.stop());
  const host = `127.0.0.1:${server.port}`;
  const alice = await session(host, "alice", "down", { reconnect: { initialDelayMs: 100, maxDelayMs: 200, giveUpAfterMs: 1500 } });
  assert.equal(alice.client.protocol, "v2");
  await server.stop();
  await until(() => alice.closes === 1, "giving up", 5000);
  assert.equal(alice.client.room.fallbacks, 0);
});

test("close() from onStatus('reconnecting') ends the connection there, with the app's code; no socket follows", async () => {
  const server = await nodeLikeServer();
  const alice = await session(server.host, "alice", "close-in-status");
  await until(() => last(alice)?.connectedUsers.length === 1, "the first snapshot");
  alice.client.onStatus((status) => {
    if (status === "reconnecting") alice.client.close();
  });
  const connections = server.offered.length;
  server.closeAll(1001);
  await until(() => alice.closes === 1, "onClose");
  await sleep(300);
  assert.equal(server.offered.length, connections);
  assert.equal(alice.client.room.closeInfo.code, 1000);
});

test("messages an earlier connection left wait for the room's first frame: a socket closed before it takes none of them", async () => {
  const server = await nodeLikeServer();
  const host = server.host;
  const first = SessionClient.create(host, { reconnect: { ...FAST, giveUpAfterMs: 200 } });
  await first.connect(token({ userId: "bob", roomId: "pending", host }), 5000);
  server.intercept = () => true; // silent
  server.closeAll(1001);
  await until(() => first.status === "reconnecting", "reconnecting");
  first.sendShapeCreate("oval", 4, 4, 4, 4);
  await until(() => first.status === "closed", "giving up");
  // The next client's first socket opens and is closed 1011 before any frame.
  let refused = 0;
  server.intercept = (socket) => {
    if (refused > 0) return false;
    refused++;
    socket.close(1011, "Room unavailable");
    return true;
  };
  const second = await session(host, "bob", "pending");
  await until(() => last(second)?.shapes.length === 1, () => JSON.stringify(last(second)));
  assert.equal(refused, 1);
  assert.equal(second.closes, 0);
});

test("connect(token, 300) rejects after 300 ms against a server that accepts TCP and never answers the upgrade; nothing is left open", async () => {
  // Node's WebSocket (undici) opens a spare TCP connection when an attempt is
  // aborted; what counts is the upgrade requests.
  const sockets = [];
  let upgrades = 0;
  const silent = createServer((socket) => {
    sockets.push(socket);
    socket.on("data", (data) => { // read the upgrade request, answer nothing
      if (data.toString().startsWith("GET ")) upgrades++;
    });
    socket.on("close", () => (socket.closedByPeer = true));
  });
  await new Promise((r) => silent.listen(0, "127.0.0.1", r));
  cleanup.push(() => new Promise((r) => { for (const s of sockets) s.destroy(); silent.close(r); }));
  const host = `127.0.0.1:${silent.address().port}`;
  const client = SessionClient.create(host);
  let closes = 0;
  client.onClose(() => closes++);
  const startedAt = Date.now();
  await assert.rejects(client.connect(token({ userId: "alice", roomId: "r", host }), 300), /WebSocket connection timeout after 300ms/);
  const took = Date.now() - startedAt;
  assert.ok(took >= 290 && took < 2000, `rejected after ${took} ms`);
  assert.equal(upgrades, 1, "one upgrade request, no reconnect");
  await until(() => sockets[0].closedByPeer, "the client to drop the TCP connection");
  await sleep(300);
  assert.equal(upgrades, 1);
  assert.equal(closes, 0, "a connection that never opened does not call onClose");
  assert.equal(client.status, "closed");
});

test("real server: SIGTERM, 3 s down, started again on the same port and data dir; the board comes back by itself with every shape (default reconnect settings)", async () => {
  let server = await startServer();
  const { port, dataDir } = server;
  cleanup.push(() => server.stop());
  const host = `127.0.0.1:${port}`;
  const alice = await session(host, "alice", "restart", { reconnect: true });
  const bob = await session(host, "bob", "restart", { reconnect: true });
  for (let i = 0; i < 3; i++) alice.client.sendShapeCreate("rectangle", i, i, 10, 10);
  await until(() => last(bob)?.shapes.length === 3, "three shapes");
  await server.stop({ keepData: true });
  await until(() => alice.client.status === "reconnecting" && bob.client.status === "reconnecting", "both reconnecting");
  assert.equal(bob.client.sendShapeCreate("text", 0, 0, 5, 5, { text: "drawn while the server was down" }), true);
  await sleep(3000);
  const restartedAt = Date.now();
  server = await startServer([], { port, dataDir });
  const whole = (s) => s.client.status === "open" && last(s).shapes.length === 4 && last(s).connectedUsers.length === 2;
  await until(() => whole(alice) && whole(bob), () => JSON.stringify(last(alice)), 10000);
  const back = Date.now() - restartedAt;
  console.log(`board back ${back} ms after the server was started again`);
  assert.ok(back < 5000, `board back after ${back} ms`);
  assert.deepEqual(last(alice).shapes.map((s) => s.text ?? s.x), [0, 1, 2, "drawn while the server was down"]);
  assert.equal(alice.closes + bob.closes, 0);
});
