// A real Chromium page using the TypeScript client's drop-in `SessionClient`
// exactly as the public React client's Session.tsx uses its own (create ->
// onMessage -> onClose -> connect(token, 45000), retried on rejection), while
// the server is stopped with SIGTERM and started again 3 s later on the same
// port and data dir: the pages show the board again by themselves, every shape
// there (one drawn while the server was down), onClose never called. Then the
// closes that mean "don't come back": 1008 Duplicate user, and 4000 Replaced by
// a new connection (the page's network frozen by a TCP proxy); the page does
// not reconnect after either.
// Usage: node restart.mjs SERVER_BINARY ARTIFACTS_DIR   (exit 0 = pass)
import { chromium } from "playwright-core";
import WebSocket from "ws";
import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer as createHttpServer } from "node:http";
import { connect as tcpConnect, createServer as createTcpServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const [binary, artifacts] = process.argv.slice(2);
mkdirSync(artifacts, { recursive: true });
const step = (what) => console.log(`[restart] ${what}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const CLIENT = join(dirname(fileURLToPath(import.meta.url)), "../../clients/typescript/dist/index.js");

const SECRET = randomBytes(24).toString("hex");
const b64url = (data) => Buffer.from(data).toString("base64url");
function token(userId, roomId, host) {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ userId, roomId, host, iat: Math.floor(Date.now() / 1000) }));
  return `${head}.${body}.${createHmac("sha256", SECRET).update(`${head}.${body}`).digest("base64url")}`;
}

async function freePort() {
  const probe = createTcpServer();
  await new Promise((r) => probe.listen(0, "127.0.0.1", r));
  const { port } = probe.address();
  await new Promise((r) => probe.close(r));
  return port;
}

// --- the server: started, stopped with SIGTERM, started again --------------
const dataDir = mkdtempSync(join(tmpdir(), "session-server-restart-"));
const port = await freePort();
const host = `127.0.0.1:${port}`;
let server = null;
const logs = [];

/** Starts the server on `port` and `dataDir`; resolves when it listens. */
async function startServer() {
  const env = { ...process.env, JWT_SECRET: SECRET, RUST_LOG: "info" };
  for (const k of ["PORT", "BACKEND_URL", "SESSION_SERVER_SECRET", "DATA_DIR", "LOG_FORMAT", "ADMIN_TOKEN"]) delete env[k];
  const child = spawn(binary, ["--port", String(port), "--bind", "127.0.0.1", "--workers", "2", "--data-dir", dataDir], {
    env, stdio: ["ignore", "pipe", "pipe"],
  });
  server = child;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  child.exited = exited;
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server not listening after 30 s:\n${logs.join("\n")}`)), 30000);
    exited.then((code) => reject(new Error(`server exited (${code}):\n${logs.join("\n")}`)));
    for (const pipe of [child.stdout, child.stderr]) {
      createInterface({ input: pipe }).on("line", (line) => {
        logs.push(line);
        if (line.includes("Listening on *:")) { clearTimeout(timer); resolve(); }
      });
    }
  });
}

async function stopServer() {
  if (!server || server.exitCode !== null || server.signalCode !== null) return;
  process.kill(server.pid, "SIGTERM");
  const killer = setTimeout(() => process.kill(server.pid, "SIGKILL"), 10000);
  await server.exited;
  clearTimeout(killer);
}

// --- the page: Session.tsx's use of the client, with a board to look at ----
const PAGE = `<!doctype html><meta charset="utf-8"><title>board</title>
<div id="status">Connecting to board…</div>
<svg id="board" width="800" height="400" style="border:1px solid #ccc"></svg>
<script type="module">
import { SessionClient } from "/client.js";
const q = new URLSearchParams(location.search);
// What the test reads: snapshots received, onClose calls, sockets opened, statuses.
const board = (window.board = { snapshots: 0, closes: 0, sockets: 0, statuses: [], connected: false });
class CountingWebSocket extends WebSocket {
  constructor(...args) { super(...args); board.sockets++; }
}
const client = SessionClient.create(q.get("host"), { WebSocket: CountingWebSocket });
board.client = client;
const status = (text) => (document.getElementById("status").textContent = text);
const svg = document.getElementById("board");
client.onMessage((data) => {
  board.snapshots++;
  status(data.connectedUsers.length + " in room: " + data.connectedUsers.join(", "));
  svg.replaceChildren(...data.shapes.map((s) => {
    const el = document.createElementNS("http://www.w3.org/2000/svg", s.type === "oval" ? "ellipse" : "rect");
    if (s.type === "oval") {
      el.setAttribute("cx", s.x + s.width / 2); el.setAttribute("cy", s.y + s.height / 2);
      el.setAttribute("rx", s.width / 2); el.setAttribute("ry", s.height / 2);
    } else {
      el.setAttribute("x", s.x); el.setAttribute("y", s.y); el.setAttribute("width", s.width); el.setAttribute("height", s.height);
    }
    el.setAttribute("fill", s.fill); el.setAttribute("stroke", s.stroke);
    el.dataset.shape = s.id; el.dataset.text = s.text ?? "";
    return el;
  }));
});
client.onClose(() => { board.closes++; status("Disconnected — You have been disconnected"); });
client.onStatus((s) => board.statuses.push(s));
// Session.tsx: connect(token, 45000), on rejection retry after 2, 4, 8, 16, 32 s.
for (const delay of [2000, 4000, 8000, 16000, 32000, null]) {
  try {
    await client.connect(q.get("token"), 45000);
    board.connected = true;
    break;
  } catch (error) {
    board.lastError = String(error);
    if (delay === null) { status("Failed to connect"); break; }
    status("Retrying Connection…");
    await new Promise((r) => setTimeout(r, delay));
  }
}
</script>`;

const http = createHttpServer((req, res) => {
  if (req.url === "/client.js") {
    res.writeHead(200, { "content-type": "text/javascript" }).end(readFileSync(CLIENT));
  } else if (req.url.startsWith("/?")) {
    res.writeHead(200, { "content-type": "text/html; charset=utf-8" }).end(PAGE);
  } else {
    res.writeHead(404).end();
  }
});
await new Promise((r) => http.listen(0, "127.0.0.1", r));
const pageBase = `http://127.0.0.1:${http.address().port}`;

/** A TCP proxy to the server whose client-to-server direction can be frozen (a network that went silent). */
async function freezableProxy() {
  const proxy = { frozen: false, sockets: [] };
  const tcp = createTcpServer((downstream) => {
    const upstream = tcpConnect(port, "127.0.0.1");
    proxy.sockets.push(downstream, upstream);
    downstream.on("data", (data) => { if (!proxy.frozen) upstream.write(data); });
    upstream.pipe(downstream);
    downstream.on("error", () => upstream.destroy());
    upstream.on("error", () => downstream.destroy());
    downstream.on("close", () => upstream.destroy());
  });
  await new Promise((r) => tcp.listen(0, "127.0.0.1", r));
  proxy.host = `127.0.0.1:${tcp.address().port}`;
  proxy.close = () => { for (const s of proxy.sockets) s.destroy(); tcp.close(); };
  return proxy;
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const held = [];
let refusedAttempts = 0;
let proxy = null;
async function open(userId, roomId, via = host) {
  const page = await (await browser.newContext({ viewport: { width: 820, height: 460 } })).newPage();
  // Refused attempts while the server is down are expected (counted, not shown).
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    if (m.text().includes("ERR_CONNECTION_REFUSED")) refusedAttempts++;
    else if (!m.text().includes("404")) step(`${userId}'s console: ${m.text()}`);
  });
  await page.goto(`${pageBase}/?host=${via}&token=${token(userId, roomId, via)}`);
  return page;
}
const board = (page) => page.evaluate(() => ({ ...window.board, client: undefined, status: window.board.client.status,
  code: window.board.client.room?.closeInfo?.code ?? null,
  shapes: document.querySelectorAll("[data-shape]").length, text: document.getElementById("status").textContent }));

try {
  await startServer();
  step(`server pid ${server.pid} on ${host}, data dir ${dataDir}`);
  const alice = await open("alice", "restart");
  const bob = await open("bob", "restart");
  for (const page of [alice, bob]) {
    await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("2 in room"), null, { timeout: 10000 });
  }
  await alice.evaluate(() => {
    const c = window.board.client;
    c.sendShapeCreate("rectangle", 40, 40, 120, 80);
    c.sendShapeCreate("text", 200, 40, 300, 40, { text: "会議メモ 🚀 — pasted ".repeat(30) });
    c.sendShapeCreate("oval", 40, 200, 100, 60, { fill: "#ff0000" });
  });
  for (const page of [alice, bob]) await page.waitForFunction(() => document.querySelectorAll("[data-shape]").length === 3, null, { timeout: 10000 });
  step("alice and bob see alice's three shapes");
  await bob.screenshot({ path: `${artifacts}/restart-1-before.png` });

  const before = { alice: await board(alice), bob: await board(bob) };
  const stoppedAt = Date.now();
  await stopServer();
  step(`server stopped with SIGTERM (exit after ${Date.now() - stoppedAt} ms)`);
  for (const page of [alice, bob]) await page.waitForFunction(() => window.board.client.status === "reconnecting", null, { timeout: 5000 });
  const queued = await bob.evaluate(() => window.board.client.sendShapeCreate("rectangle", 300, 200, 50, 50, { stroke: "#00ff00" }));
  if (queued !== true) throw new Error("a shape drawn while reconnecting was refused");
  step("both pages reconnecting; bob drew a shape meanwhile (queued)");
  await sleep(Math.max(0, 3000 - (Date.now() - stoppedAt)));

  const restartedAt = Date.now();
  await startServer();
  const listeningAfter = Date.now() - restartedAt;
  const backAfter = {};
  await Promise.all(Object.entries({ alice, bob }).map(async ([name, page]) => {
    await page.waitForFunction((n) => window.board.snapshots > n && window.board.client.status === "open"
      && document.querySelectorAll("[data-shape]").length === 4
      && document.getElementById("status").textContent.startsWith("2 in room"),
    before[name].snapshots, { timeout: 15000, polling: 10 });
    backAfter[name] = Date.now() - restartedAt;
  }));
  step(`server started again (pid ${server.pid}) 3 s after the stop, listening after ${listeningAfter} ms`);
  step(`${refusedAttempts} attempts refused while the server was down`);
  step(`board back by itself after ${backAfter.alice} ms (alice) and ${backAfter.bob} ms (bob) from the restart`);
  for (const [name, page] of [["alice", alice], ["bob", bob]]) {
    const now = await board(page);
    if (now.closes !== 0) throw new Error(`${name}'s onClose was called ${now.closes} time(s)`);
    if (now.sockets < 2) throw new Error(`${name} opened ${now.sockets} socket(s)`);
    if (Math.max(backAfter.alice, backAfter.bob) >= 5000) throw new Error(`board back after ${JSON.stringify(backAfter)} ms (bound 5000)`);
    const texts = await page.evaluate(() => [...document.querySelectorAll("[data-shape]")].map((e) => e.dataset.text.length));
    if (texts.join(",") !== `0,${"会議メモ 🚀 — pasted ".repeat(30).length},0,0`) throw new Error(`${name}'s shapes: ${texts}`);
  }
  step("every shape is there (the three from before, and bob's drawn while the server was down); onClose never called");
  await bob.screenshot({ path: `${artifacts}/restart-2-after.png` });

  // 1008: carol is in the room on another device that answers pings; the page
  // joining as carol is turned away and must not come back.
  const carolElsewhere = new WebSocket(`ws://${host}/?token=${token("carol", "restart", host)}`);
  held.push(carolElsewhere);
  await new Promise((resolve, reject) => { carolElsewhere.once("message", resolve); carolElsewhere.once("error", reject); });
  const carol = await open("carol", "restart");
  await carol.waitForFunction(() => window.board.closes === 1, null, { timeout: 10000 });
  await sleep(3000);
  const turnedAway = await board(carol);
  if (turnedAway.code !== 1008 || turnedAway.sockets !== 1 || turnedAway.status !== "closed" || turnedAway.closes !== 1 || turnedAway.statuses.includes("reconnecting")) {
    throw new Error(`after 1008 Duplicate user: ${JSON.stringify(turnedAway)}`);
  }
  step(`after 1008 Duplicate user: one socket, onClose once, no reconnect in 3 s ("${turnedAway.text}")`);

  // 4000: dave's page goes silent (its network frozen by the proxy); dave
  // connects again elsewhere; the server replaces the silent connection with
  // 4000, which reaches the page: it must not come back.
  proxy = await freezableProxy();
  const dave = await open("dave", "restart", proxy.host);
  await dave.waitForFunction(() => document.getElementById("status").textContent.includes("dave"), null, { timeout: 10000 });
  proxy.frozen = true;
  await sleep(2500); // longer than --takeover-wait-ms: the page is not "heard from recently"
  const daveElsewhere = new WebSocket(`ws://${host}/?token=${token("dave", "restart", host)}`);
  held.push(daveElsewhere);
  await dave.waitForFunction(() => window.board.closes === 1, null, { timeout: 10000 });
  await sleep(3000);
  const replaced = await board(dave);
  if (replaced.code !== 4000 || replaced.closes !== 1 || replaced.sockets !== 1 || replaced.status !== "closed" || replaced.statuses.includes("reconnecting")) {
    throw new Error(`after 4000: ${JSON.stringify(replaced)}`);
  }
  step(`after 4000 Replaced by a new connection: one socket, onClose once, no reconnect in 3 s`);
  step("pass");
} catch (error) {
  console.log(`[restart] server logs:\n${logs.slice(-40).join("\n")}`);
  throw error;
} finally {
  for (const ws of held) ws.terminate();
  proxy?.close();
  await browser.close();
  http.close();
  await stopServer();
  rmSync(dataDir, { recursive: true, force: true });
}
