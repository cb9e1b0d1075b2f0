// The drop-in `SessionClient`, driven as the public React client's Session.tsx
// drives its own: create(host) -> onMessage -> onClose -> connect(token, 45000)
// -> send*. Against the real server (v2, and v1 when asked) and against a v1
// server as the Node.js reference is one (npm `ws`, which echoes the offered
// subprotocol): the same snapshots arrive. The clients use the global
// WebSocket (Node's, browser rules; `npm test` passes --experimental-websocket).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { SessionClient } from "../build/index.js";
import { startServer, startV1Server, token, until } from "./lib.mjs";

let server;
let nodeLike;
const sessions = [];
before(async () => {
  server = await startServer();
  nodeLike = await startV1Server();
});
after(async () => {
  for (const s of sessions) s.client.close();
  await server?.stop();
  await nodeLike?.stop();
});

/** What Session.tsx does with the public client, recording what the app would see. */
async function session(host, userId, roomId, options = {}) {
  const client = SessionClient.create(host, options);
  const seen = { client, snapshots: [], closes: 0 };
  client.onMessage((snapshot) => seen.snapshots.push(snapshot));
  client.onClose(() => seen.closes++);
  sessions.push(seen);
  await client.connect(token({ userId, roomId, host }), 45000);
  return seen;
}

const last = (s) => s.snapshots[s.snapshots.length - 1];

/** A snapshot without what the server makes up (ids, timestamps), in a fixed order. */
function comparable(snapshot) {
  for (const item of [...snapshot.cursors, ...snapshot.shapes]) {
    assert.match(item.timestamp, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/, "timestamps are ISO strings, as the server sends them");
  }
  return JSON.parse(JSON.stringify({
    connectedUsers: [...snapshot.connectedUsers].sort(),
    cursors: snapshot.cursors.map(({ userId, x, y }) => ({ userId, x, y })).sort((a, b) => a.userId.localeCompare(b.userId)),
    shapes: snapshot.shapes.map(({ id, timestamp, ...rest }) => rest),
  }));
}

const PASTED = "会議メモ：来週の締切 🚀✨ — ".repeat(40);

/** Two users draw, move, update and delete in one room; returns alice's last snapshot, made comparable. */
async function scenario(host, roomId, options) {
  const alice = await session(host, "alice", roomId, options);
  const bob = await session(host, "bob", roomId, options);
  await until(() => alice.snapshots.some((s) => s.connectedUsers.length === 2), "alice sees bob");

  assert.equal(alice.client.sendShapeCreate("rectangle", 10, 20, 100, 50), true);
  await until(() => last(alice)?.shapes.length === 1, "the rectangle");
  assert.equal(bob.client.sendShapeCreate("text", 5, 5, 300, 40, { text: PASTED, fill: "#000000" }), true);
  await until(() => last(alice).shapes.length === 2 && last(bob)?.shapes.length === 2, "the text, on both");
  const [rect, text] = last(bob).shapes;
  for (let i = 0; i <= 20; i++) alice.client.sendCursorMove(i / 2, i); // a 144 Hz mouse, in short
  bob.client.sendShapeUpdate(rect.id, { x: 99, rotation: 45 });
  alice.client.sendShapeDelete(text.id);
  const done = (s) => s && s.shapes.length === 1 && s.shapes[0].x === 99 && s.cursors.some((c) => c.x === 10 && c.y === 20);
  await until(() => done(last(alice)) && done(last(bob)), () => JSON.stringify(last(bob)));
  assert.deepEqual(comparable(last(bob)), comparable(last(alice)));
  // The app's close() calls onClose once (when the socket has closed), as the public client's does.
  for (const s of [alice, bob]) s.client.close();
  await until(() => alice.closes === 1 && bob.closes === 1, "onClose after close()");
  assert.equal(alice.client.status, "closed");
  return { alice, bob, result: comparable(last(alice)) };
}

const EXPECTED = {
  connectedUsers: ["alice", "bob"],
  cursors: [{ userId: "alice", x: 10, y: 20 }],
  shapes: [{ type: "rectangle", x: 99, y: 20, width: 100, height: 50, userId: "alice", fill: "#3b82f6",
    stroke: "#1d4ed8", rotation: 45 }],
};

test("drop-in: the same snapshots from this server over v2, over v1, and from a Node-like v1 server that echoes the v2 offer", async () => {
  const host = `127.0.0.1:${server.port}`;
  const v2 = await scenario(host, "dropin-v2");
  assert.equal(v2.alice.client.protocol, "v2");
  const v1 = await scenario(host, "dropin-v1", { protocol: "v1" });
  assert.equal(v1.alice.client.protocol, "v1");
  const before = nodeLike.offered.length;
  const node = await scenario(nodeLike.host, "dropin-node");
  assert.deepEqual(nodeLike.offered.slice(before), ["whiteboard.v2", "whiteboard.v2"], "the Node-like server accepted the v2 offer");
  assert.equal(node.alice.client.protocol, "v1", "its first frame, a v1 snapshot, made the socket v1");
  assert.equal(node.alice.client.room.stats.v1ByContent, 1);
  assert.equal(node.alice.client.room.stats.lastProblem, null, "no frame was taken for an unknown v2 message");

  assert.deepEqual(v2.result, EXPECTED);
  assert.deepEqual(v1.result, EXPECTED);
  assert.deepEqual(node.result, EXPECTED);
});

test("drop-in: the text of a shape arrives whole (CJK, emoji, 1.4 KB pasted)", async () => {
  const host = `127.0.0.1:${server.port}`;
  const alice = await session(host, "alice", "dropin-text");
  alice.client.sendShapeCreate("text", 0, 0, 10, 10, { text: PASTED });
  await until(() => last(alice)?.shapes.length === 1, "the text");
  assert.equal(last(alice).shapes[0].text, PASTED);
  alice.client.close();
});

test("drop-in: sends before connect warn and return false, as the public client's", async () => {
  const client = SessionClient.create("127.0.0.1:1");
  const warnings = [];
  const warn = console.warn;
  console.warn = (...args) => warnings.push(args.join(" "));
  try {
    assert.equal(client.sendCursorMove(1, 2), false);
    assert.equal(client.sendShapeCreate("oval", 1, 2, 3, 4), false);
  } finally {
    console.warn = warn;
  }
  assert.deepEqual(warnings, ["Cannot send message: socket not connected", "Cannot send message: socket not connected"]);
  assert.equal(client.status, "closed");
  assert.equal(client.protocol, null);
});

test("drop-in: the scheme follows the page (wss on https:, ws elsewhere and in Node), an option overrides it", async () => {
  const urls = [];
  class Recorder {
    constructor(url) {
      urls.push(url);
      this.readyState = 0;
      setTimeout(() => this.onerror?.(), 0);
    }
    close() {}
  }
  const attempt = async (options) => {
    const client = SessionClient.create("example.test:4000", { WebSocket: Recorder, reconnect: false, protocol: "v1", ...options });
    await assert.rejects(client.connect("tok", 1000), /WebSocket connection failed/);
  };
  await attempt({});
  await attempt({ secure: true });
  globalThis.location = { protocol: "https:" };
  try {
    await attempt({});
    await attempt({ secure: false });
  } finally {
    delete globalThis.location;
  }
  assert.deepEqual(urls, [
    "ws://example.test:4000/?token=tok",
    "wss://example.test:4000/?token=tok",
    "wss://example.test:4000/?token=tok",
    "ws://example.test:4000/?token=tok",
  ]);
});
