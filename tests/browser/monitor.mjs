// The room monitor (/admin) in a real Chromium page while two rooms are
// driven: "hot" (3 clients moving cursors at 50 Hz) and "calm" (2 clients at
// 2 Hz). The charts' plotted points must be /admin/history's samples (the
// connections line ends at the live count), and the room table, sorted by
// messages/s, must put the hot room first, with a sparkline. A screenshot is
// kept as an artifact.
// Usage: node monitor.mjs BASE_URL ARTIFACTS_DIR   (exit 0 = pass; dev mode)
import { chromium } from "playwright-core";
import WebSocket from "ws";
import { mkdirSync } from "node:fs";

const [base, artifacts] = process.argv.slice(2);
mkdirSync(artifacts, { recursive: true });
const step = (what) => console.log(`[monitor] ${what}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The load: dev tokens (loopback), plain WebSockets, cursor moves.
const sockets = [];
const timers = [];
async function drive(room, users, hz) {
  for (let u = 0; u < users; u++) {
    const res = await fetch(`${base}/dev/token?userId=${room}-${u}&roomId=${room}`);
    const { token } = await res.json();
    const ws = new WebSocket(`${base.replace("http", "ws")}/?token=${token}`);
    await new Promise((resolve, reject) => { ws.once("open", resolve); ws.once("error", reject); });
    ws.on("message", () => {});
    sockets.push(ws);
    let x = 0;
    timers.push(setInterval(() => ws.send(JSON.stringify({ type: "cursor_move", x: x++, y: u })), 1000 / hz));
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
});
try {
  await drive("hot", 3, 50);
  await drive("calm", 2, 2);
  step("driving: hot (3 × 50 Hz), calm (2 × 2 Hz)");
  const page = await (await browser.newContext({ viewport: { width: 1200, height: 900 } })).newPage();
  await page.goto(`${base}/admin`);
  // Five seconds of samples with every connection in.
  await page.waitForFunction(() => {
    const h = window.lastHistory;
    return h && h.samples.length >= 5 && h.samples[h.samples.length - 1].connections === 5
      && h.rooms.length === 2 && document.querySelectorAll("#rooms tbody tr").length === 2;
  }, null, { timeout: 20000, polling: 100 });
  await sleep(1500); // a few more samples under load
  const seen = await page.evaluate(() => {
    const h = window.lastHistory;
    const line = document.querySelector('polyline[data-series="connections"]');
    return {
      samples: h.samples,
      points: line.getAttribute("points").trim().split(" ").map((p) => p.split(",").map(Number)),
      viewBox: line.ownerSVGElement.getAttribute("viewBox"),
      rows: [...document.querySelectorAll("#rooms tbody tr")].map((tr) => ({
        room: tr.dataset.room,
        cells: [...tr.children].map((td) => td.textContent),
        sparkline: tr.querySelector("svg[data-sparkline] polyline")?.getAttribute("points").split(" ").length ?? 0,
      })),
    };
  });
  // The chart plots every sample, and its last point is the live count.
  if (seen.points.length !== seen.samples.length) {
    throw new Error(`${seen.points.length} points for ${seen.samples.length} samples`);
  }
  const [, , , H] = seen.viewBox.split(" ").map(Number);
  const max = Math.max(...seen.samples.map((s) => Math.max(s.connections, s.rooms)));
  const last = seen.samples[seen.samples.length - 1];
  const expectedY = H - 4 - (last.connections / max) * (H - 8);
  const plottedY = seen.points[seen.points.length - 1][1];
  if (last.connections !== 5 || Math.abs(plottedY - expectedY) > 0.15) {
    throw new Error(`connections: last sample ${last.connections}, plotted at y=${plottedY}, expected y=${expectedY}`);
  }
  step(`the connections line ends at ${last.connections} (y=${plottedY}, ${seen.points.length} points = samples)`);
  // The hottest room first, with a rate and a sparkline.
  const [first, second] = seen.rows;
  if (first.room !== "hot" || second.room !== "calm") throw new Error(`room order: ${JSON.stringify(seen.rows)}`);
  const rate = (row) => Number(row.cells[2]);
  if (!(rate(first) > 5 * rate(second)) || first.sparkline < 2) {
    throw new Error(`rates: ${JSON.stringify(seen.rows)}`);
  }
  step(`hottest room first: hot at ${first.cells[2]} messages/s, calm at ${second.cells[2]}`);
  await page.screenshot({ path: `${artifacts}/monitor.png`, fullPage: true });
  step("pass");
} finally {
  for (const t of timers) clearInterval(t);
  for (const ws of sockets) ws.terminate();
  await browser.close();
}
