/*
 * @session-server/client: the reference client of session-server's whiteboard
 * protocol. It offers the delta protocol v2 (PROTOCOL-v2.md) and falls back to
 * v1 (PROTOCOL.md §3-§4) when the server does not speak it; either way `state`
 * is shaped like a v1 snapshot.
 *
 * dist/ is GENERATED from this file by `npm run build` (tsc) and committed (the
 * dev board serves it): do not edit dist/ by hand. `npm test` fails when the
 * committed dist/ is not what tsc produces from src/.
 */
/** The WebSocket subprotocol that asks for v2. */
export const SUBPROTOCOL_V2 = "whiteboard.v2";
/** An empty room, frozen all the way down (its arrays too): for comparisons. */
export const EMPTY_ROOM = Object.freeze({
    connectedUsers: Object.freeze([]),
    cursors: Object.freeze([]),
    shapes: Object.freeze([]),
});
/**
 * The sync state of a connection before its first message: a new empty room
 * every time, so that no two clients share (and a careless `push` on one
 * cannot change) a starting state.
 */
export function initialSync() {
    return { state: { connectedUsers: [], cursors: [], shapes: [] }, lastSeq: null, awaitingSnapshot: false };
}
const isObject = (v) => typeof v === "object" && v !== null && !Array.isArray(v);
const isString = (v) => typeof v === "string";
const isNumber = (v) => typeof v === "number" && Number.isFinite(v);
const isSeq = (v) => Number.isSafeInteger(v) && v >= 0;
function roomOf(msg) {
    const { connectedUsers, cursors, shapes } = msg;
    if (!Array.isArray(connectedUsers) || !Array.isArray(cursors) || !Array.isArray(shapes)) {
        return null;
    }
    return {
        connectedUsers: connectedUsers,
        cursors: cursors,
        shapes: shapes,
    };
}
/**
 * Applies one batch of v2 ops to a room, in order. Returns the new room, or
 * the reason the batch cannot be applied (an op naming a user or shape the
 * room does not have, or one that would make it differ from any v1 snapshot:
 * a second join of a connected user, a second shape with one id). The input
 * is not modified.
 */
export function applyOps(room, ops) {
    let users = null;
    let cursors = null;
    let shapes = null;
    const u = () => (users ?? (users = room.connectedUsers.slice()));
    const c = () => (cursors ?? (cursors = room.cursors.slice()));
    const s = () => (shapes ?? (shapes = room.shapes.slice()));
    const connected = (id) => (users ?? room.connectedUsers).includes(id);
    const shapeIndex = (id) => (shapes ?? room.shapes).findIndex((x) => x.id === id);
    for (let i = 0; i < ops.length; i++) {
        const op = ops[i];
        const at = `op ${i}`;
        if (!isObject(op))
            return { error: `${at} is not an object` };
        switch (op.op) {
            case "join": {
                if (!isString(op.userId))
                    return { error: `${at}: join without a userId` };
                if (connected(op.userId))
                    return { error: `${at}: join of ${op.userId}, already connected` };
                u().push(op.userId);
                break;
            }
            case "leave": {
                if (!isString(op.userId))
                    return { error: `${at}: leave without a userId` };
                const index = (users ?? room.connectedUsers).indexOf(op.userId);
                if (index < 0)
                    return { error: `${at}: leave of unknown user ${op.userId}` };
                u().splice(index, 1);
                const cursor = (cursors ?? room.cursors).findIndex((x) => x.userId === op.userId);
                if (cursor >= 0)
                    c().splice(cursor, 1);
                break;
            }
            case "cursor": {
                const { userId, x, y, timestamp } = op;
                if (!isString(userId) || !isNumber(x) || !isNumber(y) || !isString(timestamp)) {
                    return { error: `${at}: cursor without userId, x, y and timestamp` };
                }
                if (!connected(userId))
                    return { error: `${at}: cursor of unknown user ${userId}` };
                const cursor = { userId, x, y, timestamp };
                const index = (cursors ?? room.cursors).findIndex((x) => x.userId === userId);
                if (index < 0)
                    c().push(cursor);
                else
                    c()[index] = cursor;
                break;
            }
            case "add": {
                const shape = op.shape;
                if (!isObject(shape) || !isString(shape.id))
                    return { error: `${at}: add without a shape` };
                if (shapeIndex(shape.id) >= 0)
                    return { error: `${at}: add of ${shape.id}, already there` };
                s().push({ ...shape });
                break;
            }
            case "update": {
                if (!isString(op.id) || !isObject(op.set))
                    return { error: `${at}: update without id and set` };
                const index = shapeIndex(op.id);
                if (index < 0)
                    return { error: `${at}: update of unknown shape ${op.id}` };
                const list = s();
                // `id` names the shape: an `id` in `set` is ignored (the rest applies).
                const { id: _ignored, ...set } = op.set;
                void _ignored;
                list[index] = { ...list[index], ...set };
                break;
            }
            case "remove": {
                if (!isString(op.id))
                    return { error: `${at}: remove without an id` };
                const index = shapeIndex(op.id);
                if (index < 0)
                    return { error: `${at}: remove of unknown shape ${op.id}` };
                s().splice(index, 1);
                break;
            }
            default:
                return { error: `${at}: unknown op ${JSON.stringify(op.op)}` };
        }
    }
    if (!users && !cursors && !shapes)
        return room;
    return {
        connectedUsers: users ?? room.connectedUsers,
        cursors: cursors ?? room.cursors,
        shapes: shapes ?? room.shapes,
    };
}
/**
 * Applies one text frame from the server to a connection's sync state.
 *
 * - v1: every frame is a full snapshot and replaces the state.
 * - v2 (PROTOCOL-v2.md §2): a `snapshot` replaces the state and sets `lastSeq`;
 *   `ops` are applied only when `seq === lastSeq + 1`. Any other `seq` (a gap, a
 *   stale or repeated batch, ops before the first snapshot), an op naming a user or
 *   shape the state does not have, or a frame that cannot be read asks for one
 *   resync (`resync: true`) and ignores every `ops` until the next snapshot. A
 *   batch that cannot be applied is not applied at all.
 *
 * Pure: `sync` is not modified.
 */
export function applyFrame(sync, data, protocol) {
    let msg;
    try {
        msg = JSON.parse(data);
    }
    catch {
        return protocol === "v1"
            ? { sync, changed: false, resync: false, problem: "not JSON" }
            : askResync(sync, "not JSON");
    }
    if (!isObject(msg)) {
        return protocol === "v1"
            ? { sync, changed: false, resync: false, problem: "not a JSON object" }
            : askResync(sync, "not a JSON object");
    }
    if (protocol === "v1") {
        const room = roomOf(msg);
        if (!room)
            return { sync, changed: false, resync: false, problem: "not a snapshot" };
        return { sync: { state: room, lastSeq: null, awaitingSnapshot: false }, changed: true, resync: false };
    }
    switch (msg.type) {
        case "snapshot": {
            const room = roomOf(msg);
            if (!room || !isSeq(msg.seq))
                return askResync(sync, "snapshot without seq and room");
            return { sync: { state: room, lastSeq: msg.seq, awaitingSnapshot: false }, changed: true, resync: false };
        }
        case "ops": {
            if (sync.awaitingSnapshot) {
                return { sync, changed: false, resync: false, problem: "ops while waiting for a snapshot" };
            }
            if (!isSeq(msg.seq) || !Array.isArray(msg.ops))
                return askResync(sync, "ops without seq and ops");
            if (sync.lastSeq === null)
                return askResync(sync, `ops seq ${msg.seq} before any snapshot`);
            if (msg.seq !== sync.lastSeq + 1) {
                return askResync(sync, `gap: ops seq ${msg.seq} after ${sync.lastSeq}`);
            }
            const room = applyOps(sync.state, msg.ops);
            if ("error" in room)
                return askResync(sync, `ops seq ${msg.seq}: ${room.error}`);
            return {
                sync: { state: room, lastSeq: msg.seq, awaitingSnapshot: false },
                changed: room !== sync.state,
                resync: false,
            };
        }
        case "error": {
            // Outside the seq order, no state: counted, nothing else.
            const { op, reason, count } = msg;
            if (typeof op !== "string" || typeof reason !== "string" || !isSeq(count)) {
                return { sync, changed: false, resync: false, problem: "error without op, reason and count" };
            }
            return { sync, changed: false, resync: false, refused: { op, reason, count } };
        }
        default:
            // Not in PROTOCOL-v2.md: ignored, so that a newer server can add types.
            return { sync, changed: false, resync: false, problem: `unknown type ${JSON.stringify(msg.type)}` };
    }
}
function askResync(sync, problem) {
    if (sync.awaitingSnapshot)
        return { sync, changed: false, resync: false, problem };
    return { sync: { ...sync, awaitingSnapshot: true }, changed: false, resync: true, problem };
}
/** How soon after the fallback connection opens a `1008 Duplicate user` counts as its own echo. */
const DUPLICATE_AFTER_FALLBACK_MS = 2000;
const OPEN = 1;
/** The close codes a browser lets a page send (others throw): 1000 and 3000-4999. */
export function validCloseCode(code) {
    return code === 1000 || (Number.isInteger(code) && code >= 3000 && code <= 4999)
        ? code
        : 1000;
}
const timers = globalThis;
function reportError(error) {
    globalThis.console?.error("session client: a change listener threw", error);
}
/**
 * One connection to a room. `state` is the room as a v1 snapshot; it starts
 * empty and changes with every message (see `subscribe`). No reconnection: a
 * closed client stays closed (make a new one), as the public React client does.
 */
export class SessionClient {
    constructor(url, options = {}) {
        /** "v2" or "v1" once open; null before. */
        this.protocol = null;
        /** How the connection closed; null while it is open or opening. */
        this.closeInfo = null;
        this.stats = { frames: 0, changes: 0, resyncs: 0, sent: 0, lastProblem: null, refused: 0 };
        /** Attempts that offered v2 and failed before opening, then retried as v1 (0 or 1). */
        this.fallbacks = 0;
        /** v1 connections made again after a `1008 Duplicate user` right after the fallback (0 or 1). */
        this.duplicateRetries = 0;
        this.sync = initialSync();
        this.closing = false;
        /** A retry after a duplicate waiting for its timer: close() ends it at once. */
        this.pendingRetry = null;
        this.listeners = new Set();
        this.resyncTimer = null;
        /** Same as `state`, for `useSyncExternalStore(client.subscribe, client.getState)`. */
        this.getState = () => this.sync.state;
        /** Calls `listener` after every change of `state`; returns the unsubscribe function. */
        this.subscribe = (listener) => {
            this.listeners.add(listener);
            return () => {
                this.listeners.delete(listener);
            };
        };
        const Ctor = options.WebSocket ?? globalThis.WebSocket;
        if (!Ctor) {
            throw new Error("no WebSocket: pass options.WebSocket (e.g. the `ws` package's) where there is no global one");
        }
        if (options.onChange)
            this.listeners.add(options.onChange);
        this.onError = options.onError ?? reportError;
        this.resyncRetryMs = options.resyncRetryMs ?? 2000;
        const fallbackRetryMs = options.fallbackRetryMs ?? 1000;
        let opened;
        let failed;
        let closed;
        this.opened = new Promise((resolve, reject) => ((opened = resolve), (failed = reject)));
        this.opened.catch(() => { }); // a caller that never awaits it must not see an unhandled rejection
        this.closed = new Promise((resolve) => (closed = resolve));
        const finish = (info) => {
            if (this.closeInfo)
                return;
            this.closeInfo = info;
            this.stopResyncRetry();
            failed(new Error(`closed before it opened: ${info.code} ${info.reason}`));
            closed(info);
            options.onClose?.(info);
        };
        // One attempt: v2 offers the subprotocol. Browsers (and Node's WebSocket, and
        // the `ws` package) FAIL a handshake whose answer lacks an offered subprotocol,
        // which is what a v1 server sends: so when an attempt offering v2 fails before
        // it opens, the client tries once more without the offer (v1).
        const attempt = (wanted) => {
            const ws = wanted === "v2" ? new Ctor(url, [SUBPROTOCOL_V2]) : new Ctor(url);
            this.ws = ws;
            let open = false;
            let openedAt = 0;
            let done = false;
            // Handlers as properties: every WebSocket implementation has them.
            const handlers = ws;
            // After a fallback, the server may still hold the failed v2 attempt (an
            // older server behind a slow proxy sees its close late) and turn the v1
            // connection away as a duplicate of it: one more v1 attempt, a little later.
            const duplicateOfFallback = (info) => wanted === "v1" &&
                this.fallbacks > 0 &&
                this.duplicateRetries === 0 &&
                !this.closing &&
                info.code === 1008 &&
                info.reason === "Duplicate user" &&
                (!open || Date.now() - openedAt < DUPLICATE_AFTER_FALLBACK_MS);
            const retryLater = (info) => {
                this.duplicateRetries++;
                const timer = timers.setTimeout(() => {
                    this.pendingRetry = null;
                    attempt("v1");
                }, fallbackRetryMs);
                this.pendingRetry = { timer, giveUp: () => finish(info) };
            };
            const failedBeforeOpen = (info) => {
                if (done)
                    return;
                done = true;
                handlers.onopen = handlers.onmessage = handlers.onclose = handlers.onerror = null;
                if (duplicateOfFallback(info)) {
                    retryLater(info);
                }
                else if (wanted === "v2" && !this.closing) {
                    this.fallbacks++;
                    try {
                        ws.close();
                    }
                    catch {
                        // already closed
                    }
                    attempt("v1");
                }
                else {
                    finish(info);
                }
            };
            handlers.onopen = () => {
                if (done)
                    return;
                open = true;
                openedAt = Date.now();
                this.protocol = wanted === "v2" && ws.protocol === SUBPROTOCOL_V2 ? "v2" : "v1";
                opened(this.protocol);
            };
            handlers.onmessage = (event) => {
                if (open && !done)
                    this.receive(event.data);
            };
            // Before it opens, an error is a failed handshake (Node 20's WebSocket sends
            // no close event after it); after, a close event follows.
            handlers.onerror = () => {
                if (!open)
                    failedBeforeOpen({ code: 1006, reason: "", wasClean: false });
            };
            handlers.onclose = (event) => {
                const info = { code: event.code, reason: event.reason, wasClean: event.wasClean };
                if (!open)
                    return failedBeforeOpen(info);
                if (done)
                    return;
                done = true;
                if (duplicateOfFallback(info)) {
                    handlers.onopen = handlers.onmessage = handlers.onclose = handlers.onerror = null;
                    return retryLater(info);
                }
                finish(info);
            };
            return ws;
        };
        this.ws = attempt(options.protocol ?? "v2");
    }
    /** The room as a v1 snapshot (do not mutate it). */
    get state() {
        return this.sync.state;
    }
    /** The `seq` of the last v2 message applied (null in v1 and before the first snapshot). */
    get lastSeq() {
        return this.sync.lastSeq;
    }
    /** Whether the connection is open (the send helpers return false when it is not). */
    get isOpen() {
        return this.ws.readyState === OPEN;
    }
    moveCursor(x, y) {
        return this.send({ type: "cursor_move", x, y });
    }
    createShape(shape) {
        return this.send({ type: "shape_create", ...shape });
    }
    updateShape(shapeId, changes) {
        return this.send({ type: "shape_update", ...changes, shapeId });
    }
    deleteShape(shapeId) {
        return this.send({ type: "shape_delete", shapeId });
    }
    /** Asks a v2 server for a fresh snapshot (a v1 server ignores it). */
    resync() {
        const sent = this.send({ type: "resync" });
        if (sent)
            this.stats.resyncs++;
        return sent;
    }
    /** Sends any client message; false (and nothing sent) when the connection is not open. */
    send(message) {
        if (this.ws.readyState !== OPEN)
            return false;
        this.ws.send(JSON.stringify(message));
        this.stats.sent++;
        return true;
    }
    /**
     * Closes the connection. A code a browser would refuse (anything but 1000 and
     * 3000-4999: it throws and the socket stays open) becomes 1000.
     */
    close(code, reason) {
        this.closing = true;
        this.stopResyncRetry();
        if (this.pendingRetry) {
            // Between two attempts: nothing is open, the connection ends here.
            const { timer, giveUp } = this.pendingRetry;
            this.pendingRetry = null;
            timers.clearTimeout(timer);
            giveUp();
            return;
        }
        const valid = validCloseCode(code);
        try {
            this.ws.close(valid, reason);
        }
        catch {
            // A reason a browser refuses (over 123 bytes of UTF-8): close without it.
            this.ws.close(valid);
        }
    }
    receive(data) {
        if (typeof data !== "string") {
            this.stats.lastProblem = "binary frame";
            return;
        }
        this.stats.frames++;
        const result = applyFrame(this.sync, data, this.protocol ?? "v1");
        this.sync = result.sync;
        if (result.problem)
            this.stats.lastProblem = result.problem;
        if (result.refused)
            this.stats.refused += result.refused.count;
        if (result.resync) {
            this.resync();
            this.startResyncRetry();
        }
        if (!this.sync.awaitingSnapshot)
            this.stopResyncRetry();
        if (result.changed) {
            this.stats.changes++;
            const state = this.sync.state;
            // Each listener on its own: one that throws neither skips the others nor
            // escapes into the WebSocket's message handler.
            for (const listener of [...this.listeners]) {
                try {
                    listener(state);
                }
                catch (error) {
                    try {
                        this.onError(error);
                    }
                    catch {
                        // an onError that throws: nothing more to do
                    }
                }
            }
        }
    }
    // A resync the client asked for may be lost (or its answer): until a
    // snapshot arrives, ask again every `resyncRetryMs`.
    startResyncRetry() {
        if (this.resyncTimer !== null || this.closeInfo || this.closing)
            return;
        const retry = () => {
            this.resyncTimer = null;
            if (!this.sync.awaitingSnapshot || this.closeInfo || this.closing)
                return;
            this.resync();
            this.resyncTimer = timers.setTimeout(retry, this.resyncRetryMs);
        };
        this.resyncTimer = timers.setTimeout(retry, this.resyncRetryMs);
    }
    stopResyncRetry() {
        if (this.resyncTimer !== null)
            timers.clearTimeout(this.resyncTimer);
        this.resyncTimer = null;
    }
}
/** Opens a connection: `url` is the server's WebSocket URL with the token (`wss://host/?token=…`). */
export function connect(url, options = {}) {
    return new SessionClient(url, options);
}
