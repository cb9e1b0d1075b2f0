// The dev board over protocol v2 in a real browser, against a small v2 server
// written here (PROTOCOL-v2.md), until the real server speaks v2: the page is the
// one the real server serves in dev mode (fetched from BASE_URL, client module
// included), the room is this fake's. The fake drops one batch for bob on
// purpose: his page must ask for a resync and end on the right board. A third
// page with ?protocol=v1 gets v1 snapshots from the same fake room.
// Usage: node board-v2-fake.mjs BASE_URL ARTIFACTS_DIR   (exit 0 = pass)
import { chromium } from "playwright-core";
import { createServer } from "node:http";
import { mkdirSync } from "node:fs";
import { WebSocketServer } from "ws";

const [base, artifacts] = process.argv.slice(2);
mkdirSync(artifacts, { recursive: true });
const step = (what) => console.log(`[browser-v2] ${what}`);

// ---- the fake v2 server: one room, every member gets ops (v2) or snapshots (v1)
const page = await (await fetch(`${base}/`)).text();
const room = { connectedUsers: [], cursors: [], shapes: [] };
const members = new Map(); // userId -> { socket, v2, seq, dropNext }
const log = { resyncs: [], dropped: [] };
let nextId = 1;
const now = () => new Date().toISOString();
const snapshotOf = () => structuredClone(room);

function sendSnapshot(m) {
  const frame = m.v2 ? { type: "snapshot", seq: ++m.seq, ...snapshotOf() } : snapshotOf();
  m.socket.send(JSON.stringify(frame));
}
function broadcast(ops) {
  for (const [userId, m] of members) {
    if (!m.v2) { sendSnapshot(m); continue; }
    const seq = ++m.seq;
    if (m.dropNext) { m.dropNext = false; log.dropped.push({ userId, seq }); continue; } // a lost batch
    m.socket.send(JSON.stringify({ type: "ops", seq, ops }));
  }
}
function handle(userId, msg) {
  const shape = room.shapes.find((s) => s.id === msg.shapeId);
  switch (msg.type) {
    case "cursor_move": {
      const cursor = { userId, x: msg.x, y: msg.y, timestamp: now() };
      const i = room.cursors.findIndex((c) => c.userId === userId);
      if (i < 0) room.cursors.push(cursor); else room.cursors[i] = cursor;
      return broadcast([{ op: "cursor", ...cursor }]);
    }
    case "shape_create": {
      const s = { id: `f${nextId++}`, type: msg.shapeType, x: msg.x, y: msg.y, width: msg.width, height: msg.height,
        userId, timestamp: now(), ...(msg.text !== undefined ? { text: msg.text } : {}),
        fill: msg.fill ?? "#3b82f6", stroke: msg.stroke ?? "#1d4ed8", rotation: 0 };
      room.shapes.push(s);
      return broadcast([{ op: "add", shape: structuredClone(s) }]);
    }
    case "shape_update": {
      if (!shape) return;
      const set = { timestamp: now() };
      for (const k of ["x", "y", "width", "height", "rotation", "text", "fill", "stroke"]) if (k in msg) set[k] = msg[k];
      Object.assign(shape, set);
      return broadcast([{ op: "update", id: shape.id, set }]);
    }
    case "shape_delete": {
      if (!shape) return;
      room.shapes.splice(room.shapes.indexOf(shape), 1);
      return broadcast([{ op: "remove", id: shape.id }]);
    }
    case "resync": {
      log.resyncs.push(userId);
      return sendSnapshot(members.get(userId));
    }
  }
}

const http = createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  if (url.pathname === "/") { res.writeHead(200, { "content-type": "text/html" }); return res.end(page); }
  if (url.pathname === "/dev/token") { // the token is the user's name: this fake checks nothing
    const userId = url.searchParams.get("userId");
    const answer = () => {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ token: userId }));
    };
    // A slow token for "dave": a second click on Join comes while it is on its way.
    return userId === "dave" ? void setTimeout(answer, 400) : answer();
  }
  res.writeHead(404); res.end();
});
const wss = new WebSocketServer({
  server: http,
  handleProtocols: (offered) => (offered.has("whiteboard.v2") ? "whiteboard.v2" : false),
});
// The others get the join first; the newcomer's first message is a snapshot.
const sockets = []; // every connection: { userId, socket }
wss.on("connection", (socket, req) => {
  const userId = new URL(req.url, "http://x").searchParams.get("token");
  sockets.push({ userId, socket });
  const m = { socket, v2: socket.protocol === "whiteboard.v2", seq: 100, dropNext: false };
  room.connectedUsers.push(userId);
  broadcast([{ op: "join", userId }]);
  members.set(userId, m);
  sendSnapshot(m);
  socket.on("message", (data) => handle(userId, JSON.parse(data.toString())));
  socket.on("close", () => {
    members.delete(userId);
    room.connectedUsers.splice(room.connectedUsers.indexOf(userId), 1);
    const i = room.cursors.findIndex((c) => c.userId === userId);
    if (i >= 0) room.cursors.splice(i, 1);
    broadcast([{ op: "leave", userId }]);
  });
});
await new Promise((r) => http.listen(0, "127.0.0.1", r));
const fake = `http://127.0.0.1:${http.address().port}`;
step(`fake v2 server on ${fake}, serving the real dev board page`);

// ---- the browser
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let alice, bob, carol;
const newPage = async () => (await browser.newContext({ viewport: { width: 900, height: 600 } })).newPage();
const protocolOf = (p) => p.evaluate(() => document.getElementById("protocol").textContent);
const shapesOf = (p) => p.evaluate(() => JSON.stringify(window.board.state.snapshot.shapes));
try {
  alice = await newPage();
  bob = await newPage();
  await alice.goto(`${fake}/?name=alice&room=r1`);
  await bob.goto(`${fake}/?name=bob&room=r1`);
  for (const p of [alice, bob]) {
    await p.waitForFunction(() => document.getElementById("status").textContent.startsWith("2 in room"), null, { timeout: 10000 });
    await p.waitForFunction(() => window.board.protocol !== null, null, { timeout: 10000 });
  }
  for (const [name, p] of [["alice", alice], ["bob", bob]]) {
    const says = await protocolOf(p);
    if (says !== "v2") throw new Error(`${name}'s page says ${says} with a v2 server`);
  }
  step("alice's and bob's pages joined over v2 and say so");

  await alice.click('[data-tool="rectangle"]');
  const box = await alice.locator("#board").boundingBox();
  await alice.mouse.move(box.x + 100, box.y + 100);
  await alice.mouse.down();
  await alice.mouse.move(box.x + 220, box.y + 180, { steps: 5 });
  await alice.mouse.up();
  await bob.waitForSelector('[data-shape][data-type="rectangle"]', { timeout: 10000 });
  const rect = await bob.locator('[data-type="rectangle"]').evaluate((r) => [r.getAttribute("x"), r.getAttribute("y"), r.getAttribute("width"), r.getAttribute("height")]);
  if (rect.join(",") !== "100,100,120,80") throw new Error(`bob sees the rectangle at ${rect}`);
  step("bob's page applied the add op: rectangle at 100,100 120×80");

  // Lose one batch for bob, then keep changing the room: his page must see the
  // gap, ask for a resync once and land on the fake's board.
  members.get("bob").dropNext = true;
  await alice.click('[data-tool="move"]');
  await alice.mouse.move(box.x + 150, box.y + 140);
  await alice.mouse.down();
  await alice.mouse.move(box.x + 400, box.y + 300, { steps: 30 });
  await alice.mouse.up();
  await alice.click('[data-tool="oval"]');
  await alice.mouse.move(box.x + 500, box.y + 100);
  await alice.mouse.down();
  await alice.mouse.move(box.x + 580, box.y + 160, { steps: 5 });
  await alice.mouse.up();
  await bob.waitForFunction(() => document.querySelectorAll("[data-shape]").length === 2, null, { timeout: 10000 });
  await bob.waitForFunction((truth) => JSON.stringify(window.board.state.snapshot.shapes) === truth,
    JSON.stringify(room.shapes), { timeout: 10000 });
  const bobStats = await bob.evaluate(() => ({ ...window.board.client.stats }));
  if (log.dropped.length !== 1 || log.resyncs.join() !== "bob" || bobStats.resyncs !== 1) {
    throw new Error(`dropped ${JSON.stringify(log.dropped)}, resyncs asked ${JSON.stringify(log.resyncs)}, bob's stats ${JSON.stringify(bobStats)}`);
  }
  const aliceStats = await alice.evaluate(() => ({ ...window.board.client.stats }));
  if (aliceStats.resyncs !== 0) throw new Error(`alice asked for ${aliceStats.resyncs} resyncs`);
  step(`bob's page lost batch ${log.dropped[0].seq}, asked one resync and shows the fake's board`);
  await bob.screenshot({ path: `${artifacts}/v2-fake-bob.png` });

  carol = await newPage();
  await carol.goto(`${fake}/?name=carol&room=r1&protocol=v1`);
  await carol.waitForFunction(() => document.getElementById("status").textContent.startsWith("3 in room"), null, { timeout: 10000 });
  if (await protocolOf(carol) !== "v1") throw new Error(`carol's page (?protocol=v1) says ${await protocolOf(carol)}`);
  if (await shapesOf(carol) !== await shapesOf(bob)) throw new Error(`carol (v1) and bob (v2) differ:\n${await shapesOf(carol)}\n${await shapesOf(bob)}`);
  for (const [name, p] of [["alice", alice], ["bob", bob], ["carol", carol]]) {
    const codes = await p.evaluate(() => window.board.closeCodes);
    if (codes.length) throw new Error(`${name}'s connection closed with ${codes.join(", ")}`);
  }
  step("carol's page with ?protocol=v1 says v1 and shows the same shapes as bob's v2 page");

  // Cursor moves alone leave the shapes layer alone (v2 keeps the same shapes
  // array): the shape elements bob's page shows are the same elements after.
  const sync = await bob.evaluate(() => document.getElementById("sync").textContent);
  if (!/^seq \d+ · resyncs 1$/.test(sync)) throw new Error(`bob's page shows "${sync}", not its seq and one resync`);
  const rendersBefore = await bob.evaluate(() => {
    for (const node of document.querySelectorAll("[data-shape]")) node.dataset.mark = "kept";
    return window.board.shapeRenders;
  });
  await alice.click('[data-tool="move"]');
  await alice.mouse.move(box.x + 700, box.y + 400);
  await alice.mouse.move(box.x + 720, box.y + 450, { steps: 20 });
  await bob.waitForFunction(() => {
    const c = window.board.state.snapshot.cursors.find((c) => c.userId === "alice");
    return c && c.x === 720 && c.y === 450;
  }, null, { timeout: 10000 });
  await bob.waitForSelector('[data-cursor="alice"] circle[cx="720"]', { timeout: 10000 });
  const after = await bob.evaluate(() => ({ renders: window.board.shapeRenders,
    kept: [...document.querySelectorAll("[data-shape]")].map((n) => n.dataset.mark ?? "new") }));
  if (after.renders !== rendersBefore || after.kept.join() !== "kept,kept") {
    throw new Error(`cursor moves rebuilt bob's shapes: ${rendersBefore} -> ${after.renders} renders, elements ${after.kept}`);
  }
  step(`21 cursor moves: bob's page kept its shape elements (${after.renders} shape renders in all)`);

  // A double click on Join while the token is on its way: one client, one connection.
  const dave = await newPage();
  await dave.goto(`${fake}/?room=r1`);
  await dave.fill("#name", "dave");
  await dave.dblclick("#join");
  await dave.waitForFunction(() => window.board.protocol !== null, null, { timeout: 10000 });
  await new Promise((r) => setTimeout(r, 800)); // a stray second connection would be open by now
  const daves = sockets.filter((c) => c.userId === "dave");
  const open = daves.filter((c) => c.socket.readyState === 1).length;
  if (daves.length !== 1 || open !== 1) throw new Error(`a double click on Join opened ${daves.length} connections for dave (${open} open)`);
  const daveCodes = await dave.evaluate(() => window.board.closeCodes);
  if (daveCodes.length) throw new Error(`dave's connection closed with ${daveCodes.join(", ")}`);
  step("a double click on Join (slow token) made one connection");

  // When bob's connection closes, his page drops the others' cursors and the badge.
  if (!(await bob.locator('[data-cursor="alice"]').count())) throw new Error("bob's page shows no cursor of alice");
  members.get("bob").socket.close(4000, "Replaced by a new connection");
  await bob.waitForFunction(() => window.board.closes === 1, null, { timeout: 10000 });
  const closedView = await bob.evaluate(() => ({ cursors: document.querySelectorAll("[data-cursor]").length,
    badge: document.getElementById("protocol").textContent, status: document.getElementById("status").textContent }));
  if (closedView.cursors !== 0 || closedView.badge !== "–" || !closedView.status.startsWith("closed 4000")) {
    throw new Error(`bob's page after the close: ${JSON.stringify(closedView)}`);
  }
  step("bob's page, closed: no stale cursors, no protocol badge");
  step("pass");
} catch (e) {
  console.error(`[browser-v2] FAIL: ${e.stack || e}`);
  for (const [name, p] of [["alice", alice], ["bob", bob], ["carol", carol]]) {
    if (p) await p.screenshot({ path: `${artifacts}/v2-fake-fail-${name}.png` }).catch(() => {});
  }
  process.exitCode = 1;
} finally {
  await browser.close();
  for (const c of wss.clients) c.terminate();
  wss.close();
  http.close();
}
