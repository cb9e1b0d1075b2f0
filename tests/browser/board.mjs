// Two real browser pages (Debian's chromium, driven by playwright-core) use the
// dev board together: one draws and moves its cursor, the other sees both; a
// worker is killed and both pages keep working without reconnecting. The board
// connects with the TypeScript client over protocol v2 (PROTOCOL-v2.md); a third
// page with ?protocol=v1 must see the same board, and the two v2 pages must say
// they speak v2 (checked last: it fails until the server speaks v2).
// Usage: node board.mjs BASE_URL ARTIFACTS_DIR   (exit 0 = pass)
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";

const [base, artifacts] = process.argv.slice(2);
mkdirSync(artifacts, { recursive: true });
const step = (what) => console.log(`[browser] ${what}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    // Frames (and so mousemove events) as fast as the machine goes, not 60/s.
    "--disable-frame-rate-limit", "--disable-gpu-vsync"],
});
let alice, bob, carol;
const protocolOf = (page) => page.evaluate(() => document.getElementById("protocol").textContent);
try {
  alice = await (await browser.newContext({ viewport: { width: 900, height: 600 } })).newPage();
  bob = await (await browser.newContext({ viewport: { width: 900, height: 600 } })).newPage();
  await alice.goto(`${base}/?name=alice&room=r1`);
  await bob.goto(`${base}/?name=bob&room=r1`);
  for (const page of [alice, bob]) {
    await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("2 in room"), null, { timeout: 10000 });
  }
  for (const page of [alice, bob]) await page.waitForFunction(() => window.board.protocol !== null, null, { timeout: 10000 });
  step(`both pages joined room r1 (alice's page speaks ${await protocolOf(alice)}, bob's ${await protocolOf(bob)})`);

  await alice.click('[data-tool="rectangle"]');
  const box = await alice.locator("#board").boundingBox();
  await alice.mouse.move(box.x + 100, box.y + 100);
  await alice.mouse.down();
  await alice.mouse.move(box.x + 180, box.y + 150, { steps: 5 });
  await alice.mouse.move(box.x + 220, box.y + 180, { steps: 5 });
  await alice.mouse.up();
  await alice.mouse.move(box.x + 400, box.y + 300, { steps: 5 });
  await bob.waitForSelector('[data-shape][data-type="rectangle"]', { timeout: 10000 });
  await bob.waitForSelector('[data-cursor="alice"]', { timeout: 10000 });
  const rect = await bob.locator('[data-type="rectangle"]').evaluate((r) => [r.getAttribute("x"), r.getAttribute("y"), r.getAttribute("width"), r.getAttribute("height")]);
  if (rect.join(",") !== "100,100,120,80") throw new Error(`bob sees the rectangle at ${rect}`);
  step("bob sees alice's rectangle (100,100 120×80) and her cursor");
  await alice.screenshot({ path: `${artifacts}/1-alice-drew.png` });
  await bob.screenshot({ path: `${artifacts}/1-bob-sees.png` });

  // Kill the worker holding r1; the pages must keep their connections.
  const before = await (await fetch(`${base}/admin/rooms`)).json();
  const worker = before.workers.find((w) => w.rooms.includes("r1"));
  process.kill(worker.pid, "SIGKILL");
  step(`killed worker ${worker.id} (pid ${worker.pid})`);
  for (let i = 0; ; i++) {
    const now = await (await fetch(`${base}/admin/rooms`)).json();
    const pid = now.workers.find((w) => w.id === worker.id).pid;
    if (pid && pid !== worker.pid) { step(`replacement worker pid ${pid}`); break; }
    if (i > 200) throw new Error("worker not replaced");
    await new Promise((r) => setTimeout(r, 25));
  }

  await alice.click('[data-tool="oval"]');
  await alice.mouse.move(box.x + 300, box.y + 100);
  await alice.mouse.down();
  await alice.mouse.move(box.x + 380, box.y + 160, { steps: 5 });
  await alice.mouse.up();
  await bob.waitForSelector('[data-shape][data-type="oval"]', { timeout: 10000 });
  const shapes = await bob.locator("[data-shape]").count();
  if (shapes !== 2) throw new Error(`bob sees ${shapes} shapes after the crash`);
  for (const [name, page] of [["alice", alice], ["bob", bob]]) {
    const closes = await page.evaluate(() => window.board.closes);
    if (closes !== 0) throw new Error(`${name}'s connection closed ${closes} time(s)`);
  }
  step("after the worker crash: both shapes visible, no page reconnected");
  await alice.screenshot({ path: `${artifacts}/2-alice-after-crash.png` });
  await bob.screenshot({ path: `${artifacts}/2-bob-after-crash.png` });

  // Alice drags the rectangle for 15 s with the mouse never still, and the page
  // sends what the public client sends: a cursor move per mousemove event and the
  // shape every 50 ms. For the first half Playwright moves the mouse (many steps,
  // each awaited: the browser's own pace); for the second half raw input events
  // go in through the DevTools protocol every 4 ms, a 240 Hz gaming mouse. Her
  // socket must stay open and bob must end on the final position.
  await alice.click('[data-tool="move"]');
  const sentBefore = await alice.evaluate(() => window.board.sent);
  await alice.mouse.move(box.x + 150, box.y + 140); // inside the rectangle: 50,40 from its corner
  await alice.mouse.down();
  const around = (i) => [box.x + 450 + 150 * Math.cos(i / 40), box.y + 300 + 100 * Math.sin(i / 40)];
  const started = Date.now();
  for (let i = 0; Date.now() - started < 7500; i += 25) {
    const [x, y] = around(i);
    await alice.mouse.move(x, y, { steps: 25 });
  }
  const half = Date.now();
  const sentHalf = await alice.evaluate(() => window.board.sent);
  const cdp = await alice.context().newCDPSession(alice);
  const inFlight = [];
  for (let i = 0; Date.now() - started < 15000; i++) {
    const [x, y] = around(i);
    inFlight.push(cdp.send("Input.dispatchMouseEvent", { type: "mouseMoved", x, y, button: "left", buttons: 1 }));
    if (inFlight.length >= 8) await Promise.all(inFlight.splice(0));
    await new Promise((r) => setTimeout(r, 4));
  }
  await Promise.all(inFlight);
  await alice.mouse.move(box.x + 500, box.y + 400, { steps: 25 });
  await alice.mouse.up();
  const sentEnd = await alice.evaluate(() => window.board.sent);
  const rate = (n, ms) => `${n} messages in ${(ms / 1000).toFixed(1)} s (${(n / (ms / 1000)).toFixed(0)}/s)`;
  step(`alice dragged with Playwright's mouse: ${rate(sentHalf - sentBefore, half - started)}`);
  step(`alice dragged with raw input every 4 ms: ${rate(sentEnd - sentHalf, Date.now() - half)}`);
  await bob.waitForFunction(() => {
    const r = document.querySelector('[data-type="rectangle"]');
    return r && r.getAttribute("x") === "450" && r.getAttribute("y") === "360";
  }, null, { timeout: 10000 });
  await bob.waitForFunction(() => {
    const c = window.board.state.snapshot.cursors.find((c) => c.userId === "alice");
    return c && c.x === 500 && c.y === 400;
  }, null, { timeout: 10000 });
  for (const [name, page] of [["alice", alice], ["bob", bob]]) {
    const codes = await page.evaluate(() => window.board.closeCodes);
    if (codes.length !== 0) throw new Error(`${name}'s connection closed with ${codes.join(", ")}`);
  }
  step("after the 15 s drag: bob sees the rectangle at 450,360 and alice's cursor at 500,400; no close codes on either page");
  await bob.screenshot({ path: `${artifacts}/3-bob-after-drag.png` });

  // The v1 switch, for comparison: carol's page asks for v1 and must show the
  // board bob's page shows (its state is the server's v1 snapshot).
  carol = await (await browser.newContext({ viewport: { width: 900, height: 600 } })).newPage();
  await carol.goto(`${base}/?name=carol&room=r1&protocol=v1`);
  await carol.waitForFunction(() => document.getElementById("status").textContent.startsWith("3 in room"), null, { timeout: 10000 });
  const carolSays = await protocolOf(carol);
  if (carolSays !== "v1") throw new Error(`carol's page (?protocol=v1) says ${carolSays}`);
  await bob.waitForFunction(() => window.board.state.snapshot.connectedUsers.includes("carol"), null, { timeout: 10000 });
  const room = (page) => page.evaluate(() => {
    const { connectedUsers, shapes } = window.board.state.snapshot;
    return JSON.stringify({ connectedUsers: [...connectedUsers].sort(), shapes });
  });
  const [bobRoom, carolRoom] = [await room(bob), await room(carol)];
  if (bobRoom !== carolRoom) throw new Error(`bob's page (${await protocolOf(bob)}) and carol's (v1) differ:\n${bobRoom}\n${carolRoom}`);
  step(`carol's page with ?protocol=v1 says v1 and shows the board bob's page (${await protocolOf(bob)}) shows`);

  // Last, so that everything above also runs against a v1 server: the board
  // speaks v2 when the server does. FAILS until the v2 server (PROTOCOL-v2.md)
  // is merged: the page then says v1 (the client fell back).
  for (const [name, page] of [["alice", alice], ["bob", bob]]) {
    const says = await protocolOf(page);
    if (says !== "v2") throw new Error(`${name}'s page says ${says}, not v2: the server did not accept the whiteboard.v2 subprotocol`);
  }
  step("alice's and bob's pages speak v2");

  // Chromium offers permessage-deflate on every WebSocket: the three pages'
  // connections took it, and their messages (the 15 s drag's) came compressed.
  // A paste from outside the browser makes the board big enough (past 1 KiB)
  // that what the pages get comes compressed too: carol's v1 snapshots, and
  // alice's and bob's `add` op; each page must show the text as pasted.
  const { default: WebSocket } = await import("ws");
  const dana = await (await fetch(`${base}/dev/token?userId=dana&roomId=r1`)).json();
  const paste = "协作白板 🎨 ".repeat(300);
  // Without the extension, so the pages' count below is the pages' alone.
  const ws = new WebSocket(`${base.replace("http:", "ws:")}/?token=${dana.token}`, { perMessageDeflate: false });
  await new Promise((resolve, reject) => { ws.on("open", resolve); ws.on("error", reject); });
  ws.send(JSON.stringify({ type: "shape_create", shapeType: "text", x: 40, y: 40, width: 200, height: 60, text: paste }));
  for (const page of [alice, bob, carol]) {
    await page.waitForFunction((text) => window.board.state.snapshot.shapes.some((s) => s.text === text), paste, { timeout: 10000 });
  }
  ws.close();
  step("a 3.3 KB paste from another client reaches the three pages as pasted");
  const metrics = await (await fetch(`${base}/metrics`)).text();
  const metric = (name) => Number((metrics.match(new RegExp(`^${name} (\\S+)$`, "m")) ?? [])[1] ?? 0);
  const compressed = metric("session_server_connections_compressed");
  if (compressed !== 3) throw new Error(`${compressed} of the 3 pages' connections negotiated permessage-deflate`);
  const inflated = metric("session_server_messages_inflated_total");
  const sent = metric("session_server_messages_compressed_total");
  if (inflated < 1 || sent < 1) throw new Error(`compressed messages: ${inflated} from the pages, ${sent} to them`);
  step(`the 3 pages negotiated permessage-deflate: ${inflated} compressed messages from them, ${sent} to them`);
  step("pass");
} catch (e) {
  console.error(`[browser] FAIL: ${e.stack || e}`);
  if (alice) await alice.screenshot({ path: `${artifacts}/fail-alice.png` }).catch(() => {});
  if (bob) await bob.screenshot({ path: `${artifacts}/fail-bob.png` }).catch(() => {});
  if (carol) await carol.screenshot({ path: `${artifacts}/fail-carol.png` }).catch(() => {});
  process.exitCode = 1;
} finally {
  await browser.close();
}
