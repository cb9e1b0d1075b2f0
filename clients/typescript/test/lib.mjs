// Helpers for the integration tests: the real server binary, tokens, waiting.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

export const SECRET = "typescript-client-test-secret";

const b64url = (data) => Buffer.from(data).toString("base64url");

/** An HS256 token with the claims the server expects (PROTOCOL.md §1). */
export function token(claims, secret = SECRET) {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ iat: Math.floor(Date.now() / 1000), ...claims }));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** Polls `check` every 10 ms until it returns true; throws `what()` after `ms`. */
export async function until(check, what, ms = 5000) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (check()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${typeof what === "function" ? what() : what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/**
 * Starts the real server (`SESSION_SERVER_BIN`) on 127.0.0.1, port 0 (or
 * `port`), with a temp data dir (or `dataDir`: a restart), and reads its port
 * from the "Listening on *:" line. `stop()` kills it by pid (SIGTERM, then
 * SIGKILL after 5 s) and removes the data dir unless `keepData`.
 */
export async function startServer(extraArgs = [], { port: wantedPort = 0, dataDir: reusedDir } = {}) {
  const bin = process.env.SESSION_SERVER_BIN;
  if (!bin) {
    throw new Error("SESSION_SERVER_BIN is not set: `cargo build`, then SESSION_SERVER_BIN=$PWD/target/debug/session-server npm test --prefix clients/typescript");
  }
  const dataDir = reusedDir ?? mkdtempSync(join(tmpdir(), "session-server-tsclient-"));
  const env = { ...process.env, JWT_SECRET: SECRET, RUST_LOG: process.env.TEST_RUST_LOG || "info" };
  for (const k of ["PORT", "BACKEND_URL", "SESSION_SERVER_SECRET", "DATA_DIR", "LOG_FORMAT", "HATHORA_ROOMS_PER_PROCESS", "ADMIN_TOKEN"]) delete env[k];
  const child = spawn(bin, ["--port", String(wantedPort), "--bind", "127.0.0.1", "--workers", "2", "--data-dir", dataDir, ...extraArgs], {
    env, stdio: ["ignore", "pipe", "pipe"],
  });
  const logs = [];
  const port = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start in 30 s; logs:\n${logs.join("\n")}`)), 30000);
    child.on("error", (e) => { clearTimeout(timer); reject(e); });
    child.on("exit", (code) => { clearTimeout(timer); reject(new Error(`server exited (${code}); logs:\n${logs.join("\n")}`)); });
    for (const pipe of [child.stdout, child.stderr]) {
      createInterface({ input: pipe }).on("line", (line) => {
        logs.push(line);
        const m = line.split("Listening on *:")[1];
        if (m !== undefined) { clearTimeout(timer); resolve(Number(m.trim())); }
      });
    }
  });
  child.removeAllListeners("exit");
  const exited = new Promise((resolve) => child.once("exit", resolve));
  return {
    port,
    dataDir,
    pid: child.pid,
    logs,
    /** The WebSocket URL for `userId` in `roomId` (host claim = 127.0.0.1:port). */
    url(userId, roomId) {
      return `ws://127.0.0.1:${port}/?token=${token({ userId, roomId, host: `127.0.0.1:${port}` })}`;
    },
    async stop({ keepData = false } = {}) {
      if (child.exitCode === null && child.signalCode === null) {
        process.kill(child.pid, "SIGTERM");
        const killer = setTimeout(() => process.kill(child.pid, "SIGKILL"), 5000);
        await exited;
        clearTimeout(killer);
      }
      if (!keepData) rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/**
 * A v1 server as the Node.js reference is one: the `ws` package with its
 * default `handleProtocols` (it echoes the first offered subprotocol, so a v2
 * offer "succeeds" and v1 snapshots follow), a full snapshot to every member
 * after every event. Shape updates change only the fields present (the
 * reference's wipe is a bug we do not model). Tokens are read, not verified.
 */
export async function startV1Server() {
  const { WebSocketServer } = await import("ws");
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  const rooms = new Map();
  const offered = [];
  let nextId = 1;
  const snapshot = (room) => JSON.stringify({
    connectedUsers: [...room.members.keys()],
    cursors: room.cursors,
    shapes: room.shapes,
  });
  const broadcast = (room) => {
    const frame = snapshot(room);
    for (const socket of room.members.values()) socket.send(frame);
  };
  const server = {};
  wss.on("connection", (socket, req) => {
    offered.push(req.headers["sec-websocket-protocol"] ?? null);
    if (server.intercept?.(socket)) return;
    const jwt = new URL(req.url, "http://x").searchParams.get("token") ?? "";
    let claims;
    try {
      claims = JSON.parse(Buffer.from(jwt.split(".")[1], "base64url").toString());
    } catch {
      socket.close(1008, "Invalid token");
      return;
    }
    const { userId, roomId } = claims;
    if (!rooms.has(roomId)) rooms.set(roomId, { members: new Map(), cursors: [], shapes: [] });
    const room = rooms.get(roomId);
    if (room.members.has(userId)) {
      socket.close(1008, "Duplicate user");
      return;
    }
    room.members.set(userId, socket);
    socket.on("message", (data) => {
      const msg = JSON.parse(data.toString());
      const now = new Date().toISOString();
      if (msg.type === "cursor_move") {
        const cursor = room.cursors.find((c) => c.userId === userId);
        if (cursor) Object.assign(cursor, { x: msg.x, y: msg.y, timestamp: now });
        else room.cursors.push({ userId, x: msg.x, y: msg.y, timestamp: now });
      } else if (msg.type === "shape_create") {
        room.shapes.push({ id: `shape-${nextId++}`, type: msg.shapeType, x: msg.x, y: msg.y, width: msg.width,
          height: msg.height, userId, timestamp: now, text: msg.text, fill: msg.fill ?? "#3b82f6",
          stroke: msg.stroke ?? "#1d4ed8", rotation: 0 });
      } else if (msg.type === "shape_update") {
        const shape = room.shapes.find((s) => s.id === msg.shapeId);
        if (!shape) return;
        for (const k of ["x", "y", "width", "height", "rotation", "text", "fill", "stroke"]) {
          if (msg[k] !== undefined) shape[k] = msg[k];
        }
        shape.timestamp = now;
      } else if (msg.type === "shape_delete") {
        room.shapes = room.shapes.filter((s) => s.id !== msg.shapeId);
      } else {
        return;
      }
      broadcast(room);
    });
    socket.on("close", () => {
      if (room.members.get(userId) !== socket) return;
      room.members.delete(userId);
      room.cursors = room.cursors.filter((c) => c.userId !== userId);
      broadcast(room);
    });
    broadcast(room);
  });
  await new Promise((r) => wss.once("listening", r));
  return Object.assign(server, {
    /** When set, sees each new socket first; returning true takes it out of the room (the test handles it). */
    intercept: null,
    host: `127.0.0.1:${wss.address().port}`,
    /** The subprotocol header of every connection so far (null: none offered). */
    offered,
    /** Closes every open socket with `code` (the server keeps listening). */
    closeAll(code, reason = "") {
      for (const socket of wss.clients) socket.close(code, reason);
    },
    /** Stops listening and drops every socket (no close frame: 1006). */
    async stop() {
      for (const socket of wss.clients) socket.terminate();
      await new Promise((r) => wss.close(r));
    },
  });
}
