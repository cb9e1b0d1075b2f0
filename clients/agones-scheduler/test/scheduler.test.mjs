// AgonesScheduler against a fake Agones (test/fake-allocator.mjs) that allocates the way Agones
// does. Over mutual TLS with throwaway certificates when the openssl CLI is there (it is on the
// project's machines), else over plain HTTP through an injected `fetch`.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { AgonesScheduler, AgonesSchedulerError, buildAllocationRequest, buildGameServerAllocation } from "../build/index.js";
import { haveOpenssl, makeCerts } from "./certs.mjs";
import { FakeAgones, NO_SERVER } from "./fake-allocator.mjs";

const fast = { baseDelayMs: 5, maxDelayMs: 40, totalTimeoutMs: 3000, requestTimeoutMs: 2000 };

let certs;
let fake;
let srv;
const schedulers = [];

before(async () => {
  if (haveOpenssl) certs = makeCerts();
});

after(async () => {
  certs?.remove();
});

/** A fresh fake + server for each test; returns a scheduler factory. */
async function setup() {
  fake = new FakeAgones();
  srv = await fake.listen(certs ? { key: certs.server.key, cert: certs.server.cert, ca: certs.ca.cert, requestCert: true } : undefined);
}

function scheduler(opts = {}) {
  const s = new AgonesScheduler({
    url: srv.url,
    env: {},
    retry: fast,
    ...(certs ? { clientCert: certs.client.cert, clientKey: certs.client.key, ca: certs.ca.cert } : { request: fetch }),
    ...opts,
  });
  schedulers.push(s);
  return s;
}

async function teardown() {
  for (const s of schedulers.splice(0)) s.close();
  await srv?.close();
  srv = undefined;
}

describe("the allocation it sends", () => {
  test("allocator service: proto field names, four selectors in order, List priority Ascending, addValues", () => {
    assert.deepEqual(buildAllocationRequest("r1", { namespace: "default", fleet: "session-server", listName: "rooms" }), {
      namespace: "default",
      scheduling: "Packed",
      priorities: [{ type: "List", key: "rooms", order: "Ascending" }],
      gameServerSelectors: [
        { matchLabels: { "agones.dev/fleet": "session-server" }, gameServerState: "ALLOCATED", lists: { rooms: { containsValue: "r1" } } },
        { matchLabels: { "agones.dev/fleet": "session-server" }, gameServerState: "READY", lists: { rooms: { containsValue: "r1" } } },
        { matchLabels: { "agones.dev/fleet": "session-server" }, gameServerState: "ALLOCATED", lists: { rooms: { minAvailable: 1 } } },
        { matchLabels: { "agones.dev/fleet": "session-server" }, gameServerState: "READY", lists: { rooms: { minAvailable: 1 } } },
      ],
      lists: { rooms: { addValues: ["r1"] } },
    });
  });

  test("Kubernetes API: the same object with the CRD's names", () => {
    const o = buildGameServerAllocation("r1", { namespace: "games", fleet: "f", listName: "l" });
    assert.equal(o.apiVersion, "allocation.agones.dev/v1");
    assert.equal(o.kind, "GameServerAllocation");
    assert.deepEqual(o.spec.selectors.map((s) => [s.gameServerState, s.lists.l]), [
      ["Allocated", { containsValue: "r1" }],
      ["Ready", { containsValue: "r1" }],
      ["Allocated", { minAvailable: 1 }],
      ["Ready", { minAvailable: 1 }],
    ]);
    assert.deepEqual(o.spec.priorities, [{ type: "List", key: "l", order: "Ascending" }]);
    assert.deepEqual(o.spec.lists, { l: { addValues: ["r1"] } });
  });

  test("options and env: URL, namespace, fleet and list name", () => {
    const s = new AgonesScheduler({
      request: fetch,
      env: { AGONES_ALLOCATOR_URL: "https://allocator.example:8443/", AGONES_NAMESPACE: "games", AGONES_FLEET: "boards", AGONES_LIST: "r" },
    });
    assert.equal(s.url, "https://allocator.example:8443/gameserverallocation");
    const b = s.requestBody("x");
    assert.equal(b.namespace, "games");
    assert.deepEqual(b.gameServerSelectors[0].matchLabels, { "agones.dev/fleet": "boards" });
    assert.deepEqual(b.lists, { r: { addValues: ["x"] } });
    assert.throws(() => new AgonesScheduler({ env: {} }), /AGONES_ALLOCATOR_URL/);
    assert.throws(() => new AgonesScheduler({ env: { AGONES_ALLOCATOR_URL: "https://a" } }), /client certificate/);
  });
});

describe("placement", () => {
  after(teardown);
  const done = () => teardown();

  test("a second user of a room gets the first user's server, even with fuller servers around", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "gs-a", state: "Allocated", address: "203.0.113.1", port: 7001, capacity: 3, values: ["x"] });
    fake.addServer({ name: "gs-b", state: "Allocated", address: "203.0.113.2", port: 7002, capacity: 3, values: [] });
    const s = scheduler();
    const first = await s.getRoomHost("room-1");
    assert.equal(first, "203.0.113.1:7001", "the fuller server with a free place");
    fake.server("gs-b").lists.rooms.values.push("y", "z"); // gs-b: 2 of 3, the fullest with a free place …
    fake.server("gs-a").lists.rooms.values.push("w"); // … and gs-a full (3 of 3): only containsValue can pick it
    const second = await s.getRoomHost("room-1");
    assert.equal(second, first);
    assert.deepEqual(fake.holders("room-1"), ["gs-a"]);
    assert.deepEqual(fake.server("gs-a").lists.rooms.values, ["x", "room-1", "w"], "no duplicate, nothing past the capacity");
    assert.equal(fake.requests.length, 2);
  });

  test("a new room goes to the fullest Allocated server with a free place, else to a Ready one", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "ready-1", state: "Ready", address: "203.0.113.9", port: 7009, capacity: 3 });
    fake.addServer({ name: "alloc-full", state: "Allocated", address: "203.0.113.1", port: 7001, capacity: 2, values: ["a", "b"] });
    fake.addServer({ name: "alloc-1of3", state: "Allocated", address: "203.0.113.2", port: 7002, capacity: 3, values: ["c"] });
    fake.addServer({ name: "alloc-2of3", state: "Allocated", address: "203.0.113.3", port: 7003, capacity: 3, values: ["d", "e"] });
    const s = scheduler();
    assert.equal(await s.getRoomHost("n1"), "203.0.113.3:7003", "2 of 3 used: the fullest with a place");
    assert.equal(await s.getRoomHost("n2"), "203.0.113.2:7002", "alloc-2of3 is now full");
    assert.equal(await s.getRoomHost("n3"), "203.0.113.2:7002");
    assert.equal(fake.server("ready-1").state, "Ready", "untouched while Allocated servers have places");
    assert.equal(await s.getRoomHost("n4"), "203.0.113.9:7009", "every Allocated server full: a Ready one");
    assert.equal(fake.server("ready-1").state, "Allocated");
    assert.deepEqual(fake.server("ready-1").lists.rooms.values, ["n4"]);
    assert.equal(await s.getRoomHost("n5"), "203.0.113.9:7009", "now Allocated with places: filled before another Ready one");
  });

  test("only the fleet's servers, in the namespace asked", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "other-fleet", fleet: "something-else", state: "Allocated", address: "203.0.113.1", capacity: 9, values: ["v"] });
    fake.addServer({ name: "other-ns", namespace: "games", state: "Allocated", address: "203.0.113.2", capacity: 9, values: ["v"] });
    fake.addServer({ name: "ours", state: "Ready", address: "203.0.113.3", port: 7003 });
    assert.equal(await scheduler().getRoomHost("r"), "203.0.113.3:7003");
  });

  test("a full fleet: null after one more try, nothing reserved", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "gs-a", state: "Allocated", capacity: 1, values: ["a"] });
    fake.addServer({ name: "gs-b", state: "Allocated", capacity: 1, values: ["b"] });
    const s = scheduler();
    assert.equal(await s.getRoomHost("new-room"), null);
    assert.equal(fake.requests.length, 2, "noServerRetries: 1");
    assert.deepEqual(fake.holders("new-room"), []);
    // a room already on a full server still gets its server
    assert.equal(await s.getRoomHost("a"), "203.0.113.10:7000");
    // no server at all
    fake.servers = [];
    const s0 = scheduler({ retry: { ...fast, noServerRetries: 0 } });
    const before = fake.requests.length;
    assert.equal(await s0.getRoomHost("x"), null);
    assert.equal(fake.requests.length - before, 1);
    await s0.createRoom("x"); // a full fleet does not fail createRoom
  });

  test("a server that disappeared is replaced by another one on the next call", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "gs-a", state: "Allocated", address: "203.0.113.1", port: 7001, values: ["q"] });
    fake.addServer({ name: "gs-b", state: "Ready", address: "203.0.113.2", port: 7002 });
    const s = scheduler();
    assert.equal(await s.getRoomHost("room-9"), "203.0.113.1:7001");
    fake.removeServer("gs-a"); // crashed, deleted, scaled down
    assert.equal(await s.getRoomHost("room-9"), "203.0.113.2:7002");
    assert.deepEqual(fake.holders("room-9"), ["gs-b"]);
  });

  test("createRoom reserves the room's place (the same allocation) and resolves to nothing", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "gs-a", state: "Ready", address: "203.0.113.1", port: 7001 });
    const s = scheduler();
    assert.equal(await s.createRoom("board-1"), undefined);
    assert.deepEqual(fake.holders("board-1"), ["gs-a"]);
    assert.equal(fake.server("gs-a").state, "Allocated");
    assert.equal(await s.getRoomHost("board-1"), "203.0.113.1:7001");
    assert.equal(fake.requests[0].path, "/gameserverallocation");
    assert.equal(fake.requests[0].headers["content-type"], "application/json");
    assert.deepEqual(fake.requests[0].body, buildAllocationRequest("board-1", { namespace: "default", fleet: "session-server", listName: "rooms" }));
  });

  test("a Ready server still holding the room (it went back to Ready as the room was allocated) keeps it", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "gs-a", state: "Allocated", address: "203.0.113.1", port: 7001, values: ["x"] });
    fake.addServer({ name: "gs-b", state: "Ready", address: "203.0.113.2", port: 7002, values: ["room-r"] });
    assert.equal(await scheduler().getRoomHost("room-r"), "203.0.113.2:7002");
  });

  test("IPv6 addresses are bracketed, as in a Host header; formatHost overrides", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "gs-6", state: "Ready", address: "2001:db8::7", port: 7443 });
    assert.equal(await scheduler().getRoomHost("r6"), "[2001:db8::7]:7443");
    const named = scheduler({ formatHost: (a) => `${a.gameServerName}.play.example:${a.ports[0].port}` });
    assert.equal(await named.getRoomHost("r6"), "gs-6.play.example:7443");
    const a = await named.allocate("r6");
    assert.deepEqual(a.list, { values: ["r6"], capacity: 3 });
    assert.equal(a.nodeName, "gs-6-node");
  });

  test("a room id must be a non-empty string", async (t) => {
    t.after(done);
    await setup();
    await assert.rejects(scheduler().getRoomHost(""), TypeError);
    assert.equal(fake.requests.length, 0);
  });
});

describe("retries", () => {
  after(teardown);
  const done = () => teardown();

  test("429 (not a 'no server' answer: a proxy's) then 200: retried, succeeds, Retry-After honoured", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "gs-a", state: "Ready", address: "203.0.113.1", port: 7001 });
    fake.script.push({ status: 429, body: "rate limited", headers: { "retry-after": "0" } });
    const s = scheduler();
    assert.equal(await s.getRoomHost("r"), "203.0.113.1:7001");
    assert.equal(fake.requests.length, 2);
  });

  test("5xx, a dropped connection and 409 Aborted (Contention) are retried", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "gs-a", state: "Ready", address: "203.0.113.1", port: 7001 });
    fake.script.push(
      { status: 503, body: { code: 14, message: "unavailable", details: [] } },
      { destroy: true },
      { status: 409, body: { code: 10, message: "too many concurrent requests have overwhelmed the system", details: [] } },
      { status: 500, body: { code: 2, message: "unknown issue", details: [] } },
    );
    assert.equal(await scheduler().getRoomHost("r"), "203.0.113.1:7001");
    assert.equal(fake.requests.length, 5);
  });

  test("400 is not retried: AgonesSchedulerError with the status and the allocator's message", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "gs-a", state: "Ready" });
    fake.script.push({ status: 400, body: { code: 3, message: "proto: invalid value", details: [] } });
    const err = await scheduler().getRoomHost("r").catch((e) => e);
    assert.ok(err instanceof AgonesSchedulerError, String(err));
    assert.equal(err.status, 400);
    assert.equal(err.attempts, 1);
    assert.match(err.message, /proto: invalid value/);
    assert.equal(fake.requests.length, 1);
    // other 4xx: 403, 404, a 409 that is not Aborted
    for (const status of [401, 403, 404, 409]) {
      fake.script.push({ status, body: { code: 7, message: "no" } });
      await assert.rejects(scheduler().getRoomHost("r"), (e) => e.status === status && e.attempts === 1);
    }
  });

  test("bounded: at most maxAttempts tries, within the total budget", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "gs-a", state: "Ready" });
    for (let i = 0; i < 20; i++) fake.script.push({ status: 503, body: "down" });
    const t0 = Date.now();
    await assert.rejects(scheduler().getRoomHost("r"), (e) => e instanceof AgonesSchedulerError && e.attempts === 5 && e.status === 503);
    assert.equal(fake.requests.length, 5);
    // a Retry-After beyond the budget ends it early
    fake.script.unshift({ status: 503, body: "down", headers: { "retry-after": "5" } });
    await assert.rejects(
      scheduler({ retry: { ...fast, maxDelayMs: 10_000, totalTimeoutMs: 500 } }).getRoomHost("r"),
      (e) => e.attempts === 1 && e.status === 503,
    );
    assert.ok(Date.now() - t0 < 2500, `took ${Date.now() - t0} ms`);
  });

  test("an unanswered request times out and is retried", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "gs-a", state: "Allocated", address: "203.0.113.1", port: 7001, values: ["x"] });
    fake.script.push({ hang: true });
    const t0 = Date.now();
    const s = scheduler({ retry: { ...fast, requestTimeoutMs: 100 } });
    assert.equal(await s.getRoomHost("slow"), "203.0.113.1:7001");
    assert.equal(fake.requests.length, 2);
    assert.ok(Date.now() - t0 < 1000);
  });
});

describe("one room, many callers", () => {
  after(teardown);
  const done = () => teardown();

  test("concurrent calls for one room in one process make one allocation", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "gs-a", state: "Ready", address: "203.0.113.1", port: 7001 });
    fake.addServer({ name: "gs-b", state: "Ready", address: "203.0.113.2", port: 7002 });
    fake.holdMs = 50;
    const s = scheduler();
    const hosts = await Promise.all([s.getRoomHost("r"), s.getRoomHost("r"), s.createRoom("r"), s.getRoomHost("r")]);
    assert.deepEqual(hosts, ["203.0.113.1:7001", "203.0.113.1:7001", undefined, "203.0.113.1:7001"]);
    assert.equal(fake.requests.length, 1);
    // other rooms are not held up, and a later call allocates again
    const [a, b] = await Promise.all([s.getRoomHost("r"), s.getRoomHost("other")]);
    assert.equal(a, "203.0.113.1:7001");
    assert.ok(["203.0.113.1:7001", "203.0.113.2:7002"].includes(b));
    assert.equal(fake.requests.length, 3);
  });

  test("two replicas at once without a shared lock can split a room (Agones takes a server out of its list while writing it)", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "gs-a", state: "Ready", address: "203.0.113.1", port: 7001 });
    fake.addServer({ name: "gs-b", state: "Ready", address: "203.0.113.2", port: 7002 });
    fake.holdMs = 50;
    const [h1, h2] = await Promise.all([scheduler().getRoomHost("r"), scheduler().getRoomHost("r")]);
    assert.notEqual(h1, h2, "the race this package documents");
    assert.deepEqual(fake.holders("r").sort(), ["gs-a", "gs-b"]);
  });

  test("with a shared per-room lock (what a Postgres advisory lock gives across replicas) they get one server", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "gs-a", state: "Ready", address: "203.0.113.1", port: 7001 });
    fake.addServer({ name: "gs-b", state: "Ready", address: "203.0.113.2", port: 7002 });
    fake.holdMs = 50;
    const tails = new Map();
    const locked = [];
    const lock = async (roomId, fn) => {
      locked.push(roomId);
      const prev = tails.get(roomId) ?? Promise.resolve();
      let release;
      const mine = new Promise((r) => (release = r));
      tails.set(roomId, prev.then(() => mine));
      await prev;
      try {
        return await fn();
      } finally {
        release();
      }
    };
    const [h1, h2] = await Promise.all([scheduler({ lock }).getRoomHost("r"), scheduler({ lock }).getRoomHost("r")]);
    assert.equal(h1, h2);
    assert.deepEqual(fake.holders("r"), [h1 === "203.0.113.1:7001" ? "gs-a" : "gs-b"]);
    assert.equal(fake.maxInFlight, 1);
    assert.deepEqual(locked, ["r", "r"]);
  });

  test("a lock function that throws fails the call and leaves nothing behind", async (t) => {
    t.after(done);
    await setup();
    fake.addServer({ name: "gs-a", state: "Ready" });
    let fail = true;
    const s = scheduler({
      lock: (roomId, fn) => {
        if (fail) throw new Error("db down");
        return fn();
      },
    });
    await assert.rejects(s.getRoomHost("r"), /db down/);
    fail = false;
    assert.equal(await s.getRoomHost("r"), "203.0.113.10:7000");
  });
});

describe("transports", () => {
  after(teardown);
  const done = () => teardown();

  test("an injected fetch-like request function (the global fetch, plain HTTP)", async (t) => {
    t.after(done);
    fake = new FakeAgones();
    srv = await fake.listen();
    fake.addServer({ name: "gs-a", state: "Ready", address: "203.0.113.1", port: 7001 });
    const calls = [];
    const s = new AgonesScheduler({
      url: srv.url,
      env: {},
      retry: fast,
      request: (url, init) => {
        calls.push([url, init.method, init.signal instanceof AbortSignal]);
        return fetch(url, init);
      },
    });
    assert.equal(await s.getRoomHost("r"), "203.0.113.1:7001");
    assert.deepEqual(calls, [[`${srv.url}/gameserverallocation`, "POST", true]]);
  });

  test("Kubernetes API: POST …/namespaces/{ns}/gameserverallocations with a bearer token; Allocated / UnAllocated", async (t) => {
    t.after(done);
    fake = new FakeAgones({ token: "sa-token" });
    srv = await fake.listen(certs ? { key: certs.server.key, cert: certs.server.cert } : undefined);
    fake.addServer({ name: "gs-a", namespace: "games", state: "Allocated", address: "203.0.113.1", port: 7001, capacity: 2, values: ["x"] });
    fake.addServer({ name: "gs-b", namespace: "games", state: "Ready", address: "203.0.113.2", port: 7002, capacity: 1 });
    const s = new AgonesScheduler({
      transport: "kubernetes",
      url: srv.url,
      namespace: "games",
      token: "sa-token",
      env: {},
      retry: fast,
      ...(certs ? { ca: certs.ca.cert } : { request: fetch }),
    });
    schedulers.push(s);
    assert.equal(s.url, `${srv.url}/apis/allocation.agones.dev/v1/namespaces/games/gameserverallocations`);
    assert.equal(await s.getRoomHost("k1"), "203.0.113.1:7001");
    assert.equal(await s.getRoomHost("k2"), "203.0.113.2:7002");
    assert.equal(await s.getRoomHost("k1"), "203.0.113.1:7001");
    assert.equal(await s.getRoomHost("k3"), null);
    assert.equal(fake.requests[0].headers.authorization, "Bearer sa-token");
    assert.deepEqual(fake.requests[0].body, buildGameServerAllocation("k1", { namespace: "games", fleet: "session-server", listName: "rooms" }));
    // Contention is retried; a wrong token is not
    fake.script.push({ status: 201, body: { status: { state: "Contention" } } });
    assert.equal(await s.getRoomHost("k2"), "203.0.113.2:7002");
    const bad = new AgonesScheduler({ transport: "kubernetes", url: srv.url, namespace: "games", token: "nope", env: {}, retry: fast, ...(certs ? { ca: certs.ca.cert } : { request: fetch }) });
    schedulers.push(bad);
    await assert.rejects(bad.getRoomHost("k1"), (e) => e.status === 401 && e.attempts === 1);
  });

  test("Kubernetes API URL from KUBERNETES_SERVICE_HOST / PORT", () => {
    const s = new AgonesScheduler({ transport: "kubernetes", request: fetch, env: { KUBERNETES_SERVICE_HOST: "10.96.0.1", KUBERNETES_SERVICE_PORT: "443" } });
    assert.equal(s.url, "https://10.96.0.1:443/apis/allocation.agones.dev/v1/namespaces/default/gameserverallocations");
  });
});

test("the fake answers a 'no server' the way the allocator does", async (t) => {
  t.after(() => teardown());
  fake = new FakeAgones();
  srv = await fake.listen();
  const res = await fetch(`${srv.url}/gameserverallocation`, { method: "POST", body: JSON.stringify({ namespace: "default" }) });
  assert.equal(res.status, 429);
  assert.deepEqual(await res.json(), { code: 8, message: NO_SERVER, details: [] });
});
