// dist/ is GENERATED from this file by `npm run build` (clients/agones-scheduler): edit src/index.ts, never dist/.
//
// AgonesScheduler: the collab-board backend's `Scheduler` (the interface its
// HathoraScheduler implemented) on Agones. One GameServerAllocation per call, for
// one room R: a server whose `rooms` List already holds R, else the fullest
// Allocated server with a free place, else a Ready one; the allocation adds R to
// that server's List (a reservation the server gives back after its grace if the
// room never opens). The answer's `address` and `ports[0].port` are the
// `address:port` that the token's `host` claim must read.
//
// No runtime dependency: Node >= 20 built-ins only. See README.md.
import { readFileSync } from "node:fs";
import https from "node:https";
import { isIP } from "node:net";
import tls from "node:tls";
/** An allocation that failed for another reason than "no server can take the room". */
export class AgonesSchedulerError extends Error {
    /** HTTP status of the last answer, if any. */
    status;
    /** Attempts made. */
    attempts;
    constructor(message, opts) {
        super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
        this.name = "AgonesSchedulerError";
        this.status = opts.status;
        this.attempts = opts.attempts;
    }
}
const SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount";
/**
 * The allocation's four selectors, in order, with the state names of the API
 * they go to: the room's server (Allocated, or Ready when its own Ready() raced
 * an allocation), then a server with a free place (Allocated first, then Ready).
 */
function selectors(roomId, p, [allocated, ready]) {
    const matchLabels = { "agones.dev/fleet": p.fleet };
    const holds = { [p.listName]: { containsValue: roomId } };
    const hasRoom = { [p.listName]: { minAvailable: 1 } };
    return [
        [allocated, holds],
        [ready, holds],
        [allocated, hasRoom],
        [ready, hasRoom],
    ].map(([gameServerState, lists]) => ({ matchLabels, gameServerState, lists }));
}
/** Fullest first: a List priority orders by free places, `Ascending` = fewest. */
const priorities = (p) => [{ type: "List", key: p.listName, order: "Ascending" }];
/**
 * The allocator service's request (proto/allocation/allocation.proto `AllocationRequest`, JSON as
 * its REST gateway reads it: proto field names, enums by name). Selectors are tried in order;
 * within one, GameServers are searched in Packed order (Allocated first, most used nodes first,
 * then `priorities`: List `Ascending` = least free places = fullest first).
 */
export function buildAllocationRequest(roomId, p) {
    return {
        namespace: p.namespace,
        scheduling: "Packed",
        priorities: priorities(p),
        gameServerSelectors: selectors(roomId, p, ["ALLOCATED", "READY"]),
        lists: { [p.listName]: { addValues: [roomId] } },
    };
}
/** The same allocation as a Kubernetes `GameServerAllocation` object (CRD field names). */
export function buildGameServerAllocation(roomId, p) {
    return {
        apiVersion: "allocation.agones.dev/v1",
        kind: "GameServerAllocation",
        metadata: { namespace: p.namespace },
        spec: {
            scheduling: "Packed",
            priorities: priorities(p),
            selectors: selectors(roomId, p, ["Allocated", "Ready"]),
            lists: { [p.listName]: { addValues: [roomId] } },
        },
    };
}
/** `address:port` of an allocation (`[address]:port` for an IPv6 address, as a `Host` header has it). */
export function defaultFormatHost(a) {
    const port = a.ports[0].port;
    return isIP(a.address) === 6 ? `[${a.address}]:${port}` : `${a.address}:${port}`;
}
export class AgonesScheduler {
    transport;
    url;
    namespace;
    fleet;
    listName;
    retry;
    lock;
    formatHost;
    request;
    inflight = new Map();
    closers = [];
    token;
    tokenFile;
    constructor(options = {}) {
        const env = options.env ?? process.env;
        const transport = options.transport ?? env.AGONES_TRANSPORT ?? "allocator";
        if (transport !== "allocator" && transport !== "kubernetes") {
            throw new Error(`AgonesScheduler: transport must be "allocator" or "kubernetes", not ${JSON.stringify(transport)}`);
        }
        this.transport = transport;
        this.namespace = options.namespace ?? (env.AGONES_NAMESPACE || "default");
        this.fleet = options.fleet ?? (env.AGONES_FLEET || "session-server");
        this.listName = options.listName ?? (env.AGONES_LIST || "rooms");
        const r = options.retry ?? {};
        this.retry = {
            maxAttempts: r.maxAttempts ?? 5,
            totalTimeoutMs: r.totalTimeoutMs ?? 10_000,
            baseDelayMs: r.baseDelayMs ?? 100,
            maxDelayMs: r.maxDelayMs ?? 2_000,
            requestTimeoutMs: r.requestTimeoutMs ?? 5_000,
            noServerRetries: r.noServerRetries ?? 1,
        };
        if (!(this.retry.maxAttempts >= 1))
            throw new Error("AgonesScheduler: retry.maxAttempts must be at least 1");
        this.lock = options.lock ?? ((_roomId, fn) => fn());
        this.formatHost = options.formatHost ?? defaultFormatHost;
        this.token = options.token;
        this.tokenFile = options.tokenFile ?? `${SA_DIR}/token`;
        let base;
        if (transport === "allocator") {
            base = options.url ?? env.AGONES_ALLOCATOR_URL;
            if (!base)
                throw new Error("AgonesScheduler: the allocator URL is missing (option url or AGONES_ALLOCATOR_URL)");
            base = base.replace(/\/+$/, "");
            this.url = base.endsWith("/gameserverallocation") ? base : `${base}/gameserverallocation`;
        }
        else {
            base = options.url ?? env.AGONES_KUBERNETES_URL;
            if (!base && env.KUBERNETES_SERVICE_HOST) {
                const host = env.KUBERNETES_SERVICE_HOST;
                base = `https://${isIP(host) === 6 ? `[${host}]` : host}:${env.KUBERNETES_SERVICE_PORT || "443"}`;
            }
            if (!base)
                throw new Error("AgonesScheduler: the Kubernetes API URL is missing (option url, AGONES_KUBERNETES_URL or KUBERNETES_SERVICE_HOST)");
            base = base.replace(/\/+$/, "");
            this.url = `${base}/apis/allocation.agones.dev/v1/namespaces/${encodeURIComponent(this.namespace)}/gameserverallocations`;
        }
        if (options.request) {
            this.request = options.request;
        }
        else {
            if (!this.url.startsWith("https://")) {
                throw new Error(`AgonesScheduler: ${this.url} is not https:// (pass a request function for anything else)`);
            }
            const pem = (v) => v === undefined || Buffer.isBuffer(v) || v.includes("-----BEGIN") ? v : readFileSync(v);
            const serverName = options.serverName ?? (env.AGONES_ALLOCATOR_SERVER_NAME || undefined);
            let agentOptions;
            if (transport === "allocator") {
                const cert = pem(options.clientCert ?? (env.AGONES_ALLOCATOR_CLIENT_CERT || undefined));
                const key = pem(options.clientKey ?? (env.AGONES_ALLOCATOR_CLIENT_KEY || undefined));
                if (!cert || !key) {
                    throw new Error("AgonesScheduler: the allocator needs a client certificate and key (AGONES_ALLOCATOR_CLIENT_CERT, AGONES_ALLOCATOR_CLIENT_KEY)");
                }
                const ca = pem(options.ca ?? (env.AGONES_ALLOCATOR_CA || undefined));
                agentOptions = { cert, key, ...(ca ? { ca } : {}) };
            }
            else {
                let ca = pem(options.ca);
                if (ca === undefined) {
                    try {
                        ca = readFileSync(`${SA_DIR}/ca.crt`);
                    }
                    catch {
                        ca = undefined; // the system's CAs
                    }
                }
                agentOptions = ca ? { ca } : {};
            }
            if (serverName) {
                agentOptions.checkServerIdentity = (_host, cert) => tls.checkServerIdentity(serverName, cert);
                if (isIP(serverName) === 0)
                    agentOptions.servername = serverName;
            }
            const agent = new https.Agent({ keepAlive: true, maxSockets: 64, ...agentOptions });
            this.closers.push(() => agent.destroy());
            this.request = httpsRequest(agent);
        }
    }
    /** Allocates a server for the room (reserving its place there) and forgets the answer. */
    async createRoom(roomId) {
        await this.getRoomHost(roomId);
    }
    /**
     * `address:port` of the server that holds the room, or that now does (the allocation added the
     * room to its List); null when no server can take it (the fleet is full). Throws
     * AgonesSchedulerError on any other failure (after retries for the transient ones).
     */
    getRoomHost(roomId) {
        return this.allocate(roomId).then((a) => (a ? this.formatHost(a) : null));
    }
    /**
     * The allocation itself. Concurrent calls for one room in this process share one allocation
     * (the first caller's), so they get the same server.
     */
    allocate(roomId) {
        if (typeof roomId !== "string" || roomId.length === 0) {
            return Promise.reject(new TypeError("AgonesScheduler: roomId must be a non-empty string"));
        }
        const running = this.inflight.get(roomId);
        if (running)
            return running;
        // .then: the map holds `p` before the lock function runs, even if it throws at once.
        const p = Promise.resolve()
            .then(() => this.lock(roomId, () => this.allocateWithRetries(roomId)))
            .finally(() => {
            if (this.inflight.get(roomId) === p)
                this.inflight.delete(roomId);
        });
        this.inflight.set(roomId, p);
        return p;
    }
    /** The request body sent for a room (allocator: AllocationRequest; kubernetes: GameServerAllocation). */
    requestBody(roomId) {
        const p = { namespace: this.namespace, fleet: this.fleet, listName: this.listName };
        return this.transport === "allocator" ? buildAllocationRequest(roomId, p) : buildGameServerAllocation(roomId, p);
    }
    /** Closes idle keep-alive connections of the built-in HTTPS client. */
    close() {
        for (const c of this.closers.splice(0))
            c();
    }
    async allocateWithRetries(roomId) {
        const body = JSON.stringify(this.requestBody(roomId));
        const { maxAttempts, totalTimeoutMs, baseDelayMs, maxDelayMs, requestTimeoutMs, noServerRetries } = this.retry;
        const deadline = Date.now() + totalTimeoutMs;
        let noServer = 0;
        let attempt = 0;
        for (;;) {
            attempt++;
            const timeout = Math.max(1, Math.min(requestTimeoutMs, deadline - Date.now()));
            const outcome = await this.attempt(body, timeout);
            let retryAfterMs;
            switch (outcome.kind) {
                case "allocated":
                    return outcome.allocation;
                case "fatal":
                    throw new AgonesSchedulerError(`Agones allocation for room ${roomId} failed: ${outcome.message}`, {
                        status: outcome.status,
                        attempts: attempt,
                        cause: outcome.cause,
                    });
                case "noServer":
                    if (noServer++ >= noServerRetries)
                        return null;
                    break;
                case "retry":
                    retryAfterMs = outcome.retryAfterMs;
                    break;
            }
            const exp = Math.min(maxDelayMs, baseDelayMs * 2 ** (attempt - 1));
            let delay = exp / 2 + Math.random() * (exp / 2); // "equal jitter": never 0, never above the cap
            if (retryAfterMs !== undefined)
                delay = Math.min(maxDelayMs, Math.max(delay, retryAfterMs));
            const outOfTries = attempt >= maxAttempts || Date.now() + delay >= deadline;
            if (outOfTries) {
                if (outcome.kind === "noServer")
                    return null;
                throw new AgonesSchedulerError(`Agones allocation for room ${roomId} failed after ${attempt} attempt(s): ${outcome.message}`, { status: outcome.status, attempts: attempt, cause: outcome.kind === "retry" ? outcome.cause : undefined });
            }
            await new Promise((resolve) => setTimeout(resolve, delay));
        }
    }
    async attempt(body, timeoutMs) {
        const headers = { "content-type": "application/json", accept: "application/json" };
        if (this.transport === "kubernetes") {
            let token = this.token;
            if (token === undefined) {
                try {
                    token = readFileSync(this.tokenFile, "utf8").trim();
                }
                catch (e) {
                    return { kind: "fatal", message: `cannot read the service account token ${this.tokenFile}`, cause: e };
                }
            }
            headers.authorization = `Bearer ${token}`;
        }
        const ac = new AbortController();
        const timer = setTimeout(() => ac.abort(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
        let status;
        let text;
        let retryAfter;
        try {
            const res = await this.request(this.url, { method: "POST", headers, body, signal: ac.signal });
            status = res.status;
            retryAfter = res.headers.get("retry-after");
            text = await res.text();
        }
        catch (e) {
            if (isPermanentTlsError(e)) {
                return { kind: "fatal", message: `TLS: ${errorText(e)}`, cause: e };
            }
            let message = `network: ${errorText(e)}`;
            if (this.transport === "allocator" && isObject(e) && e.code === "ECONNRESET") {
                // TLS 1.3: the allocator checks the client certificate after the client's handshake is done,
                // and its refusal often shows as a reset; it cannot be told apart from a real one.
                message += " (a reset at every try may be the allocator refusing the client certificate: is its CA in allocator-client-ca?)";
            }
            return { kind: "retry", message, cause: e };
        }
        finally {
            clearTimeout(timer);
        }
        return this.transport === "allocator"
            ? classifyAllocatorAnswer(status, text, retryAfter, this.listName)
            : classifyKubernetesAnswer(status, text, retryAfter, this.listName);
    }
}
function classifyAllocatorAnswer(status, text, retryAfter, listName) {
    const json = parseJson(text);
    if (status === 200) {
        if (!isObject(json))
            return { kind: "fatal", status, message: `200 without a JSON body: ${snippet(text)}` };
        return toAllocated(status, json, listName);
    }
    // grpc-gateway errors: {"code": <gRPC code>, "message": "...", "details": []}
    const code = isObject(json) && typeof json.code === "number" ? json.code : undefined;
    const message = isObject(json) && typeof json.message === "string" ? json.message : snippet(text);
    // UnAllocated: gRPC ResourceExhausted (8) = HTTP 429 by default; the status is the allocator's
    // --http-unallocated-status-code, the message is fixed.
    if (/no available GameServer/i.test(message) || (status === 429 && code === 8)) {
        return { kind: "noServer", status, message: `${status}: ${message}` };
    }
    return byStatus(status, message, retryAfter, code === 10);
}
function classifyKubernetesAnswer(status, text, retryAfter, listName) {
    const json = parseJson(text);
    if (status === 200 || status === 201) {
        const st = isObject(json) && isObject(json.status) ? json.status : undefined;
        if (!st)
            return { kind: "fatal", status, message: `${status} without a GameServerAllocation status: ${snippet(text)}` };
        if (st.state === "Allocated")
            return toAllocated(status, st, listName);
        if (st.state === "UnAllocated")
            return { kind: "noServer", status, message: "UnAllocated" };
        if (st.state === "Contention")
            return { kind: "retry", status, message: "Contention" };
        return { kind: "fatal", status, message: `unknown allocation state ${JSON.stringify(st.state)}` };
    }
    const message = isObject(json) && typeof json.message === "string" ? json.message : snippet(text);
    return byStatus(status, message, retryAfter, false);
}
function byStatus(status, message, retryAfter, aborted) {
    const m = `${status}: ${message}`;
    if (status === 429 || status >= 500 || (status === 409 && aborted)) {
        const ms = parseRetryAfter(retryAfter);
        return ms === undefined ? { kind: "retry", status, message: m } : { kind: "retry", status, message: m, retryAfterMs: ms };
    }
    return { kind: "fatal", status, message: m };
}
function toAllocated(status, o, listName) {
    const ports = Array.isArray(o.ports) ? o.ports : [];
    const first = ports[0];
    const port = isObject(first) ? Number(first.port) : NaN;
    const address = typeof o.address === "string" ? o.address : "";
    if (!address || !Number.isInteger(port) || port <= 0 || port > 65535) {
        return { kind: "fatal", status, message: `allocated ${String(o.gameServerName)} without an address and port: ${snippet(JSON.stringify(o))}` };
    }
    const allocation = {
        gameServerName: typeof o.gameServerName === "string" ? o.gameServerName : "",
        address,
        ports: ports.filter(isObject).map((p) => ({ name: typeof p.name === "string" ? p.name : "", port: Number(p.port) })),
    };
    if (typeof o.nodeName === "string")
        allocation.nodeName = o.nodeName;
    const lists = isObject(o.lists) ? o.lists : undefined;
    const l = lists && isObject(lists[listName]) ? lists[listName] : undefined;
    if (l) {
        // protojson writes the Int64Value capacity as a string; the Kubernetes API as a number.
        const cap = l.capacity === undefined || l.capacity === null ? null : Number(l.capacity);
        allocation.list = {
            values: Array.isArray(l.values) ? l.values.filter((v) => typeof v === "string") : [],
            capacity: cap !== null && Number.isFinite(cap) ? cap : null,
        };
    }
    return { kind: "allocated", allocation };
}
function httpsRequest(agent) {
    return (url, init) => new Promise((resolve, reject) => {
        const req = https.request(url, { method: init.method, headers: init.headers, agent, signal: init.signal }, (res) => {
            const chunks = [];
            res.on("data", (c) => chunks.push(c));
            res.on("error", reject);
            res.on("end", () => {
                const body = Buffer.concat(chunks).toString("utf8");
                resolve({
                    status: res.statusCode ?? 0,
                    headers: {
                        get(name) {
                            const v = res.headers[name.toLowerCase()];
                            return v === undefined ? null : Array.isArray(v) ? v.join(", ") : v;
                        },
                    },
                    text: () => Promise.resolve(body),
                });
            });
        });
        req.on("error", reject);
        req.end(init.body);
    });
}
// Certificate problems do not heal by retrying: a wrong CA, a name not in the certificate, a
// client certificate the allocator refuses (TLS 1.3 reports that as an alert after the handshake).
const TLS_CODES = new Set([
    "DEPTH_ZERO_SELF_SIGNED_CERT",
    "SELF_SIGNED_CERT_IN_CHAIN",
    "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
    "UNABLE_TO_GET_ISSUER_CERT",
    "UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
    "CERT_HAS_EXPIRED",
    "CERT_NOT_YET_VALID",
    "CERT_UNTRUSTED",
    "CERT_REJECTED",
    "CERT_SIGNATURE_FAILURE",
    "ERR_TLS_CERT_ALTNAME_INVALID",
    "ERR_OSSL_PEM_NO_START_LINE",
    "ERR_OSSL_X509_KEY_VALUES_MISMATCH",
]);
function isPermanentTlsError(e) {
    const code = isObject(e) && typeof e.code === "string" ? e.code : "";
    return (TLS_CODES.has(code) ||
        /^ERR_SSL_(SSLV3|TLSV1|TLSV13)_ALERT_(BAD_CERTIFICATE|CERTIFICATE_REQUIRED|UNKNOWN_CA|CERTIFICATE_UNKNOWN|CERTIFICATE_EXPIRED|CERTIFICATE_REVOKED|UNSUPPORTED_CERTIFICATE|ACCESS_DENIED)$/.test(code));
}
function parseRetryAfter(v) {
    if (!v)
        return undefined;
    if (/^\d+$/.test(v.trim()))
        return Number(v.trim()) * 1000;
    const t = Date.parse(v);
    return Number.isNaN(t) ? undefined : Math.max(0, t - Date.now());
}
function parseJson(text) {
    try {
        return JSON.parse(text);
    }
    catch {
        return undefined;
    }
}
function isObject(v) {
    return typeof v === "object" && v !== null && !Array.isArray(v);
}
function snippet(s) {
    return s.length > 300 ? `${s.slice(0, 300)}…` : s;
}
function errorText(e) {
    if (e instanceof Error) {
        const code = e.code;
        return typeof code === "string" ? `${code}: ${e.message}` : e.message;
    }
    return String(e);
}
