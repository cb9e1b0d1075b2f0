// A fake Agones for the tests: the allocator service's REST endpoint
// (POST /gameserverallocation, proto JSON) and the Kubernetes API's
// (POST /apis/allocation.agones.dev/v1/namespaces/{ns}/gameserverallocations, CRD JSON),
// both over one in-memory set of GameServers, allocating the way Agones does. Read from
// googleforgames/agones:
// - pkg/allocation/converters/converter.go       request → GameServerAllocation (absent state = READY)
// - pkg/apis/allocation/v1/gameserverallocation.go  ApplyDefaults, Converter, Matches, matchLists, ListActions
// - pkg/gameserverallocations/allocation_cache.go   ListSortedGameServers (Packed order)
// - pkg/apis/agones/v1/gameserver.go              CompareCountAndListPriorities, AppendListValues
// - pkg/gameserverallocations/find.go             selectors in order, the first match of each in list order
// - pkg/gameserverallocations/allocator.go        a server being written is out of the list until written
// - pkg/allocation/converters/converter.go + cmd/allocator/main.go  UnAllocated → gRPC ResourceExhausted → HTTP 429
// - pkg/util/runtime/runtime.go NewServerMux      JSON with proto names, unpopulated fields emitted, unknown fields dropped

import http from "node:http";
import https from "node:https";

export const NO_SERVER = "there is no available GameServer to allocate";

export class FakeAgones {
  constructor({ token = "test-token" } = {}) {
    /** @type {any[]} */
    this.servers = [];
    /** every request received: { path, headers, body, tlsClient } */
    this.requests = [];
    /** answers to give before allocating: { status, body, headers }, { destroy: true } or { hang: true } */
    this.script = [];
    /** ms a chosen server stays "being written" (out of the list) before the answer */
    this.holdMs = 0;
    this.token = token;
    this.inFlight = 0;
    this.maxInFlight = 0;
    this.seq = 0;
  }

  addServer({
    name,
    namespace = "default",
    fleet = "session-server",
    state = "Ready",
    nodeName = `${name}-node`,
    address = "203.0.113.10",
    port = 7000,
    capacity = 3,
    values = [],
    listName = "rooms",
    labels = {},
  }) {
    const gs = {
      name,
      namespace,
      labels: { "agones.dev/fleet": fleet, ...labels },
      annotations: {},
      state,
      nodeName,
      address,
      ports: [{ name: "default", port }],
      lists: { [listName]: { capacity, values: [...values] } },
      counters: {},
      updating: false,
    };
    this.servers.push(gs);
    return gs;
  }

  removeServer(name) {
    this.servers = this.servers.filter((s) => s.name !== name);
  }

  server(name) {
    return this.servers.find((s) => s.name === name);
  }

  /** Which server holds a value of the list. */
  holders(value, listName = "rooms") {
    return this.servers.filter((s) => s.lists[listName]?.values.includes(value)).map((s) => s.name);
  }

  // ---- allocation, the Agones way -------------------------------------------------

  /** Packed order: allocation_cache.go ListSortedGameServers. */
  sorted(gsa) {
    const list = this.servers.filter((s) => !s.updating && (s.state === "Ready" || s.state === "Allocated"));
    const counts = new Map(); // gameservers.PerNodeCounter
    for (const s of this.servers) {
      const c = counts.get(s.nodeName) ?? { ready: 0, allocated: 0 };
      if (s.state === "Ready") c.ready++;
      if (s.state === "Allocated") c.allocated++;
      counts.set(s.nodeName, c);
    }
    const less = (a, b) => {
      if (a.state !== b.state) return a.state === "Allocated";
      const c1 = counts.get(a.nodeName);
      if (!c1) return false;
      const c2 = counts.get(b.nodeName);
      if (!c2) return true;
      if (c1.allocated > c2.allocated) return true;
      if (c1.allocated < c2.allocated) return false;
      if (c1.ready < c2.ready) return false;
      if (c1.ready > c2.ready) return true;
      const res = comparePriorities(gsa.priorities, a, b);
      if (res !== null) return res;
      return a.name < b.name;
    };
    if (gsa.scheduling === "Distributed") {
      // ListSortedGameServersPriorities (CountsAndLists on, priorities set)
      return list.sort((a, b) => {
        const r1 = comparePriorities(gsa.priorities, a, b);
        const l1 = r1 !== null ? r1 : a.name < b.name;
        const r2 = comparePriorities(gsa.priorities, b, a);
        const l2 = r2 !== null ? r2 : b.name < a.name;
        return l1 ? -1 : l2 ? 1 : 0;
      });
    }
    return list.sort((a, b) => (less(a, b) ? -1 : less(b, a) ? 1 : 0));
  }

  /** find.go findGameServerForAllocation + allocator.go applyAllocationToGameServer. */
  allocate(gsa) {
    const list = this.sorted(gsa);
    const found = new Array(gsa.selectors.length).fill(null);
    for (const gs of list) {
      if (gs.namespace !== gsa.namespace) continue;
      gsa.selectors.forEach((sel, j) => {
        if (found[j] === null && matches(sel, gs)) found[j] = gs;
      });
    }
    const gs = found.find((g) => g !== null);
    if (!gs) return null;
    gs.annotations["agones.dev/last-allocated"] = new Date().toISOString();
    gs.state = "Allocated";
    for (const [name, la] of Object.entries(gsa.lists ?? {})) {
      const l = gs.lists[name];
      if (!l) continue; // "List not found": an event, the allocation still succeeds
      if (la.capacity !== undefined) {
        l.capacity = la.capacity;
        l.values = l.values.slice(0, l.capacity);
      }
      if (la.addValues?.length) {
        // AppendListValues: duplicates dropped, then truncated to the capacity
        for (const v of la.addValues) if (!l.values.includes(v)) l.values.push(v);
        l.values = l.values.slice(0, l.capacity);
      }
      if (la.deleteValues?.length) l.values = l.values.filter((v) => !la.deleteValues.includes(v));
    }
    return gs;
  }

  // ---- HTTP ------------------------------------------------------------------------

  async handle(req, res) {
    const chunks = [];
    for await (const c of req) chunks.push(c);
    const text = Buffer.concat(chunks).toString("utf8");
    let body;
    try {
      body = JSON.parse(text);
    } catch {
      body = undefined;
    }
    this.requests.push({
      path: req.url,
      headers: req.headers,
      body,
      tlsClient: req.socket.getPeerCertificate?.()?.subject?.CN,
    });
    const scripted = this.script.shift();
    if (scripted) {
      if (scripted.hang) return; // never answers (closed by close())
      if (scripted.destroy) {
        req.socket.destroy();
        return;
      }
      res.writeHead(scripted.status, { "content-type": "application/json", ...(scripted.headers ?? {}) });
      res.end(typeof scripted.body === "string" ? scripted.body : JSON.stringify(scripted.body ?? {}));
      return;
    }
    const kube = /^\/apis\/allocation\.agones\.dev\/v1\/namespaces\/([^/]+)\/gameserverallocations$/.exec(req.url ?? "");
    if (req.method !== "POST" || (req.url !== "/gameserverallocation" && !kube)) {
      return send(res, 404, { code: 5, message: "Not Found", details: [] });
    }
    if (kube && req.headers.authorization !== `Bearer ${this.token}`) {
      return send(res, 401, { kind: "Status", apiVersion: "v1", status: "Failure", message: "Unauthorized", reason: "Unauthorized", code: 401 });
    }
    let gsa;
    try {
      if (body === undefined) throw new Error("the body is not JSON");
      gsa = kube ? fromGameServerAllocation(body, decodeURIComponent(kube[1])) : fromAllocationRequest(body);
      validate(gsa);
    } catch (e) {
      return kube
        ? send(res, 422, { kind: "Status", apiVersion: "v1", status: "Failure", message: e.message, reason: "Invalid", code: 422 })
        : send(res, 400, { code: 3, message: e.message, details: [] });
    }
    const gs = this.allocate(gsa);
    if (gs) {
      // allocator.go: the chosen server leaves the list while it is written, and comes back after
      gs.updating = true;
      this.inFlight++;
      this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
      if (this.holdMs > 0) await new Promise((r) => setTimeout(r, this.holdMs));
      gs.updating = false;
      this.inFlight--;
      if (!this.servers.includes(gs)) {
        return send(res, 500, { code: 2, message: "unknown issue", details: [] });
      }
    } else if (this.holdMs > 0) {
      await new Promise((r) => setTimeout(r, this.holdMs));
    }
    if (kube) {
      const name = gs ? gs.name : `gsa-${++this.seq}`;
      const out = {
        apiVersion: "allocation.agones.dev/v1",
        kind: "GameServerAllocation",
        metadata: { name, namespace: gsa.namespace, creationTimestamp: null },
        spec: body.spec,
        status: gs
          ? {
              state: "Allocated",
              gameServerName: gs.name,
              ports: gs.ports,
              address: gs.address,
              addresses: [{ type: "ExternalIP", address: gs.address }],
              nodeName: gs.nodeName,
              source: "local",
              metadata: { labels: gs.labels, annotations: gs.annotations },
              lists: structuredClone(gs.lists),
            }
          : { state: "UnAllocated", gameServerName: "", source: "" },
      };
      return send(res, 201, out);
    }
    if (!gs) return send(res, 429, { code: 8, message: NO_SERVER, details: [] });
    // AllocationResponse, protojson with UseProtoNames + EmitUnpopulated (Int64Value → string)
    return send(res, 200, {
      gameServerName: gs.name,
      ports: gs.ports,
      address: gs.address,
      addresses: [{ type: "ExternalIP", address: gs.address }],
      nodeName: gs.nodeName,
      source: "local",
      metadata: { labels: gs.labels, annotations: gs.annotations },
      counters: {},
      lists: Object.fromEntries(
        Object.entries(gs.lists).map(([k, l]) => [k, { values: [...l.values], capacity: String(l.capacity) }]),
      ),
    });
  }

  /**
   * Listens on 127.0.0.1 (HTTPS when `tls` is given: { key, cert, ca, requestCert }).
   * Returns { url, close }.
   */
  async listen(tls) {
    const handler = (req, res) => {
      this.handle(req, res).catch((e) => {
        res.writeHead(500);
        res.end(String(e));
      });
    };
    const server = tls
      ? https.createServer(
          { key: tls.key, cert: tls.cert, ca: tls.ca, requestCert: !!tls.requestCert, rejectUnauthorized: !!tls.requestCert },
          handler,
        )
      : http.createServer(handler);
    await new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", resolve);
    });
    const { port } = server.address();
    return {
      url: `${tls ? "https" : "http"}://127.0.0.1:${port}`,
      port,
      server,
      close: () =>
        new Promise((resolve) => {
          server.closeAllConnections?.();
          server.close(() => resolve());
        }),
    };
  }
}

function send(res, status, obj) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(obj));
}

// ---- matching: gameserverallocation.go ----------------------------------------------

function matches(sel, gs) {
  for (const [k, v] of Object.entries(sel.matchLabels ?? {})) if (gs.labels[k] !== v) return false;
  if (sel.gameServerState && gs.state !== sel.gameServerState) return false;
  if (sel.lists && Object.keys(sel.lists).length) {
    for (const [name, ls] of Object.entries(sel.lists)) {
      const l = gs.lists?.[name];
      if (!l) return false;
      const available = l.capacity - l.values.length;
      if (available < ls.minAvailable || (ls.maxAvailable !== 0 && available > ls.maxAvailable)) return false;
      if (ls.containsValue !== "" && !l.values.includes(ls.containsValue)) return false;
    }
  }
  return true;
}

/** gameserver.go CompareCountAndListPriorities: true (a first), false (b first) or null (tie). */
function comparePriorities(priorities, a, b) {
  for (const p of priorities ?? []) {
    const res = comparePriority(p, a, b);
    if (res !== null) return p.order === "Descending" ? !res : res;
  }
  return null;
}

function comparePriority(p, a, b) {
  const pick = (gs) => (p.type === "List" ? gs.lists?.[p.key] : gs.counters?.[p.key]);
  const avail = (x) => (p.type === "List" ? x.capacity - x.values.length : x.capacity - x.count);
  const x1 = pick(a);
  const x2 = pick(b);
  if (x1 && x2) {
    const a1 = avail(x1);
    const a2 = avail(x2);
    if (a1 < a2) return true;
    if (a1 > a2) return false;
    return null;
  }
  if ((x1 && p.order === "Descending") || (x2 && p.order === "Ascending")) return false;
  if ((x1 && p.order === "Ascending") || (x2 && p.order === "Descending")) return true;
  return null;
}

function validate(gsa) {
  if (gsa.scheduling !== "Packed" && gsa.scheduling !== "Distributed") throw new Error(`spec.scheduling: Unsupported value: "${gsa.scheduling}"`);
  gsa.selectors.forEach((s, i) => {
    if (s.gameServerState !== "Ready" && s.gameServerState !== "Allocated") {
      throw new Error(`spec.selectors[${i}].gameServerState: GameServerState must be either Allocated or Ready`);
    }
    for (const [k, l] of Object.entries(s.lists ?? {})) {
      if (l.minAvailable < 0 || l.maxAvailable < 0) throw new Error(`spec.selectors[${i}].lists[${k}]: must be greater than or equal to 0`);
      if (l.maxAvailable < l.minAvailable && l.maxAvailable !== 0) {
        throw new Error(`spec.selectors[${i}].lists[${k}]: maxAvailable must zero or greater than minAvailable ${l.minAvailable}`);
      }
    }
  });
  for (const p of gsa.priorities ?? []) {
    if (p.type !== "Counter" && p.type !== "List") throw new Error('type must be "Counter" or "List"');
    if (!p.key) throw new Error("key must not be nil");
  }
}

// ---- request decoding --------------------------------------------------------------

/** protojson enum: its name or its number. */
function enumValue(v, names, field) {
  if (v === undefined || v === null) return names[0];
  if (typeof v === "number" && names[v] !== undefined) return names[v];
  if (typeof v === "string" && names.includes(v)) return v;
  throw new Error(`proto: (line 1:1): invalid value for enum field ${field}: ${JSON.stringify(v)}`);
}

/** protojson int64: a number or a decimal string. */
function int64(v, field) {
  if (v === undefined || v === null) return 0;
  if (typeof v === "number" && Number.isInteger(v)) return v;
  if (typeof v === "string" && /^-?\d+$/.test(v)) return Number(v);
  throw new Error(`proto: invalid value for int64 field ${field}: ${JSON.stringify(v)}`);
}

function protoSelector(s) {
  if (s === null || typeof s !== "object" || Array.isArray(s)) throw new Error("proto: GameServerSelector must be an object");
  const state = enumValue(s.gameServerState, ["READY", "ALLOCATED"], "gameServerState");
  const out = {
    matchLabels: s.matchLabels ?? {},
    gameServerState: state === "ALLOCATED" ? "Allocated" : "Ready",
  };
  if (s.lists) {
    out.lists = {};
    for (const [k, l] of Object.entries(s.lists)) {
      out.lists[k] = {
        containsValue: l.containsValue ?? "",
        minAvailable: int64(l.minAvailable, "minAvailable"),
        maxAvailable: int64(l.maxAvailable, "maxAvailable"),
      };
    }
  }
  return out;
}

/** allocation.proto AllocationRequest (JSON) → internal GameServerAllocation (converter.go). */
export function fromAllocationRequest(b) {
  if (b === null || typeof b !== "object" || Array.isArray(b)) throw new Error("proto: AllocationRequest must be an object");
  let selectors = (b.gameServerSelectors ?? []).map(protoSelector);
  if (selectors.length === 0) {
    // Converter(): preferred..., required (a zero selector = every Ready GameServer)
    selectors = [...(b.preferredGameServerSelectors ?? []).map(protoSelector), protoSelector(b.requiredGameServerSelector ?? {})];
  }
  const lists = {};
  for (const [k, l] of Object.entries(b.lists ?? {})) {
    lists[k] = {
      addValues: l.addValues ?? [],
      deleteValues: l.deleteValues ?? [],
      ...(l.capacity !== undefined && l.capacity !== null ? { capacity: int64(l.capacity, "capacity") } : {}),
    };
  }
  return {
    namespace: b.namespace ?? "",
    scheduling: enumValue(b.scheduling, ["Packed", "Distributed"], "scheduling"),
    priorities: (b.priorities ?? []).map((p) => ({
      type: enumValue(p.type, ["Counter", "List"], "type"),
      key: p.key ?? "",
      order: enumValue(p.order, ["Ascending", "Descending"], "order"),
    })),
    selectors,
    lists,
  };
}

/** A GameServerAllocation object (CRD JSON) → the same internal form (ApplyDefaults + Converter). */
export function fromGameServerAllocation(b, namespace) {
  if (b?.apiVersion !== "allocation.agones.dev/v1" || b?.kind !== "GameServerAllocation") {
    throw new Error("not an allocation.agones.dev/v1 GameServerAllocation");
  }
  const spec = b.spec ?? {};
  const sel = (s) => ({
    matchLabels: s.matchLabels ?? {},
    gameServerState: s.gameServerState ?? "Ready",
    lists: Object.fromEntries(
      Object.entries(s.lists ?? {}).map(([k, l]) => [
        k,
        { containsValue: l.containsValue ?? "", minAvailable: l.minAvailable ?? 0, maxAvailable: l.maxAvailable ?? 0 },
      ]),
    ),
  });
  let selectors = (spec.selectors ?? []).map(sel);
  if (selectors.length === 0) selectors = [...(spec.preferred ?? []).map(sel), sel(spec.required ?? {})];
  return {
    namespace,
    scheduling: spec.scheduling ?? "Packed",
    priorities: (spec.priorities ?? []).map((p) => ({ type: p.type, key: p.key, order: p.order || "Ascending" })),
    selectors,
    lists: Object.fromEntries(
      Object.entries(spec.lists ?? {}).map(([k, l]) => [k, { addValues: l.addValues ?? [], deleteValues: l.deleteValues ?? [], capacity: l.capacity }]),
    ),
  };
}
