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
 * Starts the real server (`SESSION_SERVER_BIN`) on 127.0.0.1, port 0, with a
 * temp data dir, and reads its port from the "Listening on *:" line. `stop()`
 * kills it by pid (SIGTERM, then SIGKILL after 5 s) and removes the data dir.
 */
export async function startServer(extraArgs = []) {
  const bin = process.env.SESSION_SERVER_BIN;
  if (!bin) {
    throw new Error("SESSION_SERVER_BIN is not set: `cargo build`, then SESSION_SERVER_BIN=$PWD/target/debug/session-server npm test --prefix clients/typescript");
  }
  const dataDir = mkdtempSync(join(tmpdir(), "session-server-tsclient-"));
  const env = { ...process.env, JWT_SECRET: SECRET, RUST_LOG: process.env.TEST_RUST_LOG || "info" };
  for (const k of ["PORT", "BACKEND_URL", "SESSION_SERVER_SECRET", "DATA_DIR", "LOG_FORMAT", "HATHORA_ROOMS_PER_PROCESS", "ADMIN_TOKEN"]) delete env[k];
  const child = spawn(bin, ["--port", "0", "--bind", "127.0.0.1", "--workers", "2", "--data-dir", dataDir, ...extraArgs], {
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
    pid: child.pid,
    logs,
    /** The WebSocket URL for `userId` in `roomId` (host claim = 127.0.0.1:port). */
    url(userId, roomId) {
      return `ws://127.0.0.1:${port}/?token=${token({ userId, roomId, host: `127.0.0.1:${port}` })}`;
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        process.kill(child.pid, "SIGTERM");
        const killer = setTimeout(() => process.kill(child.pid, "SIGKILL"), 5000);
        await exited;
        clearTimeout(killer);
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}
