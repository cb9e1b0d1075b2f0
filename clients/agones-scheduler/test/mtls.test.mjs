// Mutual TLS with the built-in HTTPS client, against the fake allocator serving HTTPS and requiring
// a client certificate signed by its CA (as agones-allocator does: RequireAnyClientCert + a check
// against the allocator-client-ca secret). Certificates are made per run with the openssl CLI.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { AgonesScheduler, AgonesSchedulerError } from "../build/index.js";
import { haveOpenssl, makeCerts } from "./certs.mjs";
import { FakeAgones } from "./fake-allocator.mjs";

const fast = { baseDelayMs: 5, maxDelayMs: 40, totalTimeoutMs: 3000, requestTimeoutMs: 2000 };

describe("mutual TLS", { skip: haveOpenssl ? false : "no openssl CLI to make certificates" }, () => {
  let certs;
  const servers = [];
  const schedulers = [];

  before(() => {
    certs = makeCerts();
  });

  after(async () => {
    for (const s of schedulers) s.close();
    for (const s of servers) await s.close();
    certs?.remove();
  });

  async function allocator(serverCert = certs.server) {
    const fake = new FakeAgones();
    fake.addServer({ name: "gs-a", state: "Ready", address: "203.0.113.1", port: 7001 });
    const srv = await fake.listen({ key: serverCert.key, cert: serverCert.cert, ca: certs.ca.cert, requestCert: true });
    servers.push(srv);
    return { fake, srv };
  }

  function make(opts) {
    const s = new AgonesScheduler({ env: {}, retry: fast, ...opts });
    schedulers.push(s);
    return s;
  }

  test("the allocator's CA, a client certificate it trusts: allocated, and the allocator saw the client certificate", async () => {
    const { fake, srv } = await allocator();
    const s = make({ url: srv.url, clientCert: certs.client.cert, clientKey: certs.client.key, ca: certs.ca.cert });
    assert.equal(await s.getRoomHost("r"), "203.0.113.1:7001");
    assert.equal(fake.requests[0].tlsClient, "allocator-client");
  });

  test("files named by the environment variables (the secrets mounted as files)", async () => {
    const { srv } = await allocator();
    const s = make({
      env: {
        AGONES_ALLOCATOR_URL: srv.url,
        AGONES_ALLOCATOR_CLIENT_CERT: certs.client.certPath,
        AGONES_ALLOCATOR_CLIENT_KEY: certs.client.keyPath,
        AGONES_ALLOCATOR_CA: certs.ca.certPath,
      },
    });
    assert.equal(await s.getRoomHost("r"), "203.0.113.1:7001");
  });

  test("a client certificate the allocator does not trust: refused, never gets through", async () => {
    const { fake, srv } = await allocator();
    const s = make({ url: srv.url, clientCert: certs.strangerclient.cert, clientKey: certs.strangerclient.key, ca: certs.ca.cert });
    const err = await s.getRoomHost("r").catch((e) => e);
    assert.ok(err instanceof AgonesSchedulerError, String(err));
    // The refusal comes after the client's side of a TLS 1.3 handshake: either as the server's
    // alert (not retried) or as a bare reset (retried, bounded, with a hint in the message).
    if (err.attempts === 1) assert.match(err.message, /TLS: ERR_SSL_TLSV13_ALERT_/);
    else assert.match(err.message, /after 5 attempt\(s\): network: ECONNRESET.*allocator-client-ca/);
    assert.equal(fake.requests.length, 0);
  });

  test("a server certificate not from the given CA: refused, not retried", async () => {
    const { fake, srv } = await allocator(certs.otherserver);
    const s = make({ url: srv.url, clientCert: certs.client.cert, clientKey: certs.client.key, ca: certs.ca.cert });
    const err = await s.getRoomHost("r").catch((e) => e);
    assert.ok(err instanceof AgonesSchedulerError, String(err));
    assert.equal(err.attempts, 1, err.message);
    assert.match(err.message, /UNABLE_TO_VERIFY_LEAF_SIGNATURE|certificate/i);
    assert.equal(fake.requests.length, 0);
  });

  test("a certificate for the load balancer IP only (Helm's): refused by URL host, accepted with serverName", async () => {
    const { srv } = await allocator(certs.lbserver);
    const base = { url: srv.url, clientCert: certs.client.cert, clientKey: certs.client.key, ca: certs.ca.cert };
    await assert.rejects(make(base).getRoomHost("r"), (e) => e.attempts === 1 && /ERR_TLS_CERT_ALTNAME_INVALID/.test(e.message));
    assert.equal(await make({ ...base, serverName: "203.0.113.7" }).getRoomHost("r"), "203.0.113.1:7001");
    assert.equal(await make({ ...base, env: { AGONES_ALLOCATOR_SERVER_NAME: "203.0.113.7" } }).getRoomHost("r"), "203.0.113.1:7001");
    await assert.rejects(make({ ...base, serverName: "203.0.113.8" }).getRoomHost("r"), /ERR_TLS_CERT_ALTNAME_INVALID/);
  });

  test("keep-alive: many allocations over the agent, close() lets the process exit", async () => {
    const { fake, srv } = await allocator();
    fake.server("gs-a").lists.rooms.capacity = 50;
    const s = make({ url: srv.url, clientCert: certs.client.cert, clientKey: certs.client.key, ca: certs.ca.cert });
    const hosts = await Promise.all(Array.from({ length: 20 }, (_, i) => s.getRoomHost(`room-${i}`)));
    assert.deepEqual(new Set(hosts), new Set(["203.0.113.1:7001"]));
    assert.equal(fake.server("gs-a").lists.rooms.values.length, 20);
  });
});
