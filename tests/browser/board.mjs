// Two real browser pages (Debian's chromium, driven by playwright-core) use the
// dev board together: one draws and moves its cursor, the other sees both; a
// worker is killed and both pages keep working without reconnecting.
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
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let alice, bob;
try {
  alice = await (await browser.newContext({ viewport: { width: 900, height: 600 } })).newPage();
  bob = await (await browser.newContext({ viewport: { width: 900, height: 600 } })).newPage();
  await alice.goto(`${base}/?name=alice&room=r1`);
  await bob.goto(`${base}/?name=bob&room=r1`);
  for (const page of [alice, bob]) {
    await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("2 in room"), null, { timeout: 10000 });
  }
  step("both pages joined room r1");

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
  step("pass");
} catch (e) {
  console.error(`[browser] FAIL: ${e.stack || e}`);
  if (alice) await alice.screenshot({ path: `${artifacts}/fail-alice.png` }).catch(() => {});
  if (bob) await bob.screenshot({ path: `${artifacts}/fail-bob.png` }).catch(() => {});
  process.exitCode = 1;
} finally {
  await browser.close();
}
