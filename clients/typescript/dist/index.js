/*
 * @session-server/client: the reference client of session-server's whiteboard
 * protocol. It offers the delta protocol v2 (PROTOCOL-v2.md) and falls back to
 * v1 (PROTOCOL.md §3-§4) when the server does not speak it; either way the room
 * is shaped like a v1 snapshot. Two ways in:
 *
 * - `connect(url, options)`: a `RoomConnection`, for new apps;
 * - `SessionClient`: the public React client's session class, same surface,
 *   for a drop-in switch (one import, or this file copied over its
 *   `sessionClient.ts`).
 *
 * Both reconnect by themselves after an unexpected close (`RECONNECT_CODES`).
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
/**
 * Whether a frame is a v1 snapshot (an object with the three arrays and no
 * `type`). A server that echoes every offered subprotocol but speaks v1 (the
 * Node.js server's `ws` does) is found by its first frame being one.
 */
export function isV1Snapshot(data) {
    let msg;
    try {
        msg = JSON.parse(data);
    }
    catch {
        return false;
    }
    return isObject(msg) && msg.type === undefined && roomOf(msg) !== null;
}
/**
 * The close codes after which the client reconnects by itself: 1001 Going Away
 * (this server's drain, a proxy going down), 1005 (no code), 1006 (no close
 * frame: a crash, a lost network), 1011 Internal Error, 1012 Service Restart,
 * 1013 Try Again Later, 1014 Bad Gateway. Any other code is final: 1000, 1008
 * (a full room, a duplicate user, a rate limit), 1002/1003/1007/1009 (what was
 * sent was refused; it would be again), 4000 (replaced by a newer connection of
 * the same user), 4001-4999 and 3000-3999 (the server's or a proxy's refusals).
 */
export const RECONNECT_CODES = Object.freeze([1001, 1005, 1006, 1011, 1012, 1013, 1014]);
/**
 * A socket that brought the room back and closed again within this many ms
 * does not start a new series: the backoff goes on growing (a server or room
 * that crashes as soon as it is joined is not hammered).
 */
const STABLE_AFTER_MS = 5000;
/** The reconnect settings when an option is left out. */
export const RECONNECT_DEFAULTS = Object.freeze({
    initialDelayMs: 250,
    maxDelayMs: 3000,
    attemptTimeoutMs: 10000,
    giveUpAfterMs: 60000,
    maxQueued: 1000,
});
/** How soon after the fallback connection opens a `1008 Duplicate user` counts as its own echo. */
const DUPLICATE_AFTER_FALLBACK_MS = 2000;
const OPEN = 1;
/** The close codes a browser lets a page send (others throw): 1000 and 3000-4999. */
export function validCloseCode(code) {
    return code === 1000 || (Number.isInteger(code) && code >= 3000 && code <= 4999)
        ? code
        : 1000;
}
/**
 * Drops a socket the client gave up on: closed, and torn down where the
 * implementation can (the `ws` package's `terminate`), so a peer that never
 * answers the close frame does not hold it (or a Node process) open.
 */
function abandon(ws) {
    try {
        ws.close();
    }
    catch {
        // not open: nothing to close
    }
    ws.terminate?.();
}
const timers = globalThis;
function reportError(error) {
    globalThis.console?.error("session client: a change listener threw", error);
}
/**
 * One connection to a room, reconnecting by itself after an unexpected close
 * (see `ConnectOptions.reconnect`). `state` is the room as a v1 snapshot; it
 * starts empty and changes with every message (see `subscribe`); while
 * reconnecting it stays as it was, and the new connection's first snapshot
 * replaces it.
 */
export class RoomConnection {
    constructor(url, options = {}) {
        /** "v2" or "v1" on the current socket once known; null before the first. */
        this.protocol = null;
        /** Where the connection is (see `ConnectionStatus`). */
        this.status = "connecting";
        /** How the connection closed for good; null until then. */
        this.closeInfo = null;
        this.stats = {
            frames: 0, changes: 0, resyncs: 0, sent: 0, lastProblem: null, refused: 0, reconnects: 0, v1ByContent: 0,
            queueFull: 0,
        };
        /** Attempts that offered v2 and failed before opening, then retried as v1. */
        this.fallbacks = 0;
        /** v1 connections made again after a `1008 Duplicate user` right after the fallback (0 or 1). */
        this.duplicateRetries = 0;
        this.sync = initialSync();
        this.attempt = null;
        this.closing = false;
        /** What the app's `close()` asked for: the connection ends with it. */
        this.closeRequest = null;
        /** Ends the reconnect series when the room is not back in time (`giveUpAfterMs`). */
        this.giveUpTimer = null;
        /** When the room last came back, and after how many failed attempts (see `STABLE_AFTER_MS`). */
        this.cameBack = null;
        /** The last socket was v1 after its v2 offer failed the handshake (a server that does not echo the offer). */
        this.lastFellBack = false;
        /** `resolve` gave a URL this series (another server, maybe of another kind). */
        this.movedThisSeries = false;
        this.unsentMessages = [];
        /** A wait before the next attempt (after a duplicate, or reconnecting), and what the connection closes with if it ends during it. */
        this.waiting = null;
        /** The connect timeout of the attempt in flight. */
        this.attemptTimer = null;
        /** Reconnecting since (ms), the failed attempts so far, and the close that started it. */
        this.lost = null;
        this.queue = [];
        this.queuedCursor = null;
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
        this.Ctor = Ctor;
        this.url = url;
        this.options = options;
        this.preferred = options.protocol ?? "v2";
        this.reconnectOptions =
            options.reconnect === false
                ? null
                : { ...RECONNECT_DEFAULTS, ...(typeof options.reconnect === "object" ? options.reconnect : {}) };
        if (options.onChange)
            this.listeners.add(options.onChange);
        this.onError = options.onError ?? reportError;
        this.resyncRetryMs = options.resyncRetryMs ?? 2000;
        this.fallbackRetryMs = options.fallbackRetryMs ?? 1000;
        this.connectTimeoutMs = options.connectTimeoutMs ?? 30000;
        this.opened = new Promise((resolve, reject) => (this.settleOpened = { resolve, reject }));
        this.opened.catch(() => { }); // a caller that never awaits it must not see an unhandled rejection
        this.closed = new Promise((resolve) => (this.settleClosed = resolve));
        this.queue = [...(options.pending ?? [])];
        this.dial(this.preferred);
        this.startAttemptTimer(this.connectTimeoutMs);
    }
    /** The room as a v1 snapshot (do not mutate it). */
    get state() {
        return this.sync.state;
    }
    /** The `seq` of the last v2 message applied (null in v1 and before the first snapshot). */
    get lastSeq() {
        return this.sync.lastSeq;
    }
    /** Whether a socket is open now and the room on it (messages go out at once). */
    get isOpen() {
        return this.attempt?.ws.readyState === OPEN && this.attempt.ready;
    }
    /** What was waiting to be sent when the connection ended for good (it was not sent). */
    get unsent() {
        return this.unsentMessages;
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
        const attempt = this.attempt;
        if (!attempt || !this.isOpen)
            return false;
        this.write(attempt, { type: "resync" });
        this.stats.resyncs++;
        return true;
    }
    /**
     * Sends any client message. Open: it goes out at once. Reconnecting: it waits
     * for the new connection (see `ReconnectOptions.maxQueued`; a resync does not
     * wait). Otherwise (connecting the first time, closed) nothing is sent. True
     * when sent or waiting, false when not.
     */
    send(message) {
        const attempt = this.attempt;
        if (attempt && this.isOpen) {
            this.write(attempt, message);
            return true;
        }
        if (this.closeInfo || this.closing)
            return false;
        // Waiting for the room: reconnecting; a socket open whose first frame is
        // not here (messages from an earlier connection wait ahead); or a socket
        // closing (its close event not yet here), which will reconnect or keep
        // what waits in `unsent`.
        const waiting = this.status === "reconnecting" ||
            (attempt !== null && attempt.open) ||
            (this.status === "open" && this.reconnectOptions !== null);
        return waiting && this.enqueue(message);
    }
    /**
     * Closes the connection for good. A code a browser would refuse (anything but
     * 1000 and 3000-4999: it throws and the socket stays open) becomes 1000.
     */
    close(code, reason) {
        if (this.closeInfo || this.closing)
            return;
        this.closing = true;
        const valid = validCloseCode(code);
        this.closeRequest = { code: valid, reason: reason ?? "", wasClean: true };
        // The connection ends here, whatever the socket does next (a peer that
        // never answers the close frame must not keep it alive, or reconnecting).
        const attempt = this.attempt;
        if (attempt) {
            this.detach(attempt);
            try {
                attempt.ws.close(valid, reason);
            }
            catch {
                // A reason a browser refuses (over 123 bytes of UTF-8): close without it.
                try {
                    attempt.ws.close(valid);
                }
                catch {
                    // already closed
                }
            }
        }
        this.finish(this.closeRequest);
    }
    // --- sockets -------------------------------------------------------------
    dial(wanted) {
        const ws = wanted === "v2" ? new this.Ctor(this.url, [SUBPROTOCOL_V2]) : new this.Ctor(this.url);
        const attempt = { ws, wanted, open: false, openedAt: 0, sniffing: false, heard: false, ready: false };
        this.attempt = attempt;
        // Handlers as properties: every WebSocket implementation has them.
        const handlers = ws;
        handlers.onopen = () => {
            if (this.attempt === attempt)
                this.opening(attempt);
        };
        handlers.onmessage = (event) => {
            if (this.attempt === attempt && attempt.open)
                this.receive(attempt, event.data);
        };
        // Before it opens, an error is a failed handshake (Node 20's WebSocket sends
        // no close event after it); after, a close event follows.
        handlers.onerror = () => {
            if (this.attempt === attempt && !attempt.open)
                this.ended(attempt, { code: 1006, reason: "", wasClean: false });
        };
        handlers.onclose = (event) => {
            if (this.attempt === attempt) {
                this.ended(attempt, { code: event.code, reason: event.reason, wasClean: event.wasClean });
            }
        };
    }
    /** Forgets a socket: its events are ignored from now on. */
    detach(attempt) {
        const handlers = attempt.ws;
        handlers.onopen = handlers.onmessage = handlers.onclose = handlers.onerror = null;
        if (this.attempt === attempt)
            this.attempt = null;
    }
    opening(attempt) {
        attempt.open = true;
        attempt.openedAt = Date.now();
        this.protocol = attempt.wanted === "v2" && attempt.ws.protocol === SUBPROTOCOL_V2 ? "v2" : "v1";
        this.lastFellBack = attempt.wanted === "v1" && this.preferred === "v2";
        attempt.sniffing = this.protocol === "v2";
        // A new socket: its first snapshot replaces the state (kept until then).
        this.sync = { state: this.sync.state, lastSeq: null, awaitingSnapshot: false };
        this.settleOpened.resolve(this.protocol);
        // Reconnecting, an open socket is not yet the room: a server may open and
        // then close it (a room that cannot be placed, a drain). Its first frame is
        // (`receive`); until then messages keep waiting and the attempt can time out.
        if (this.lost)
            return;
        this.stopAttemptTimer();
        if (this.queue.length > 0) {
            // Messages of an earlier connection (`pending`) wait for the room too,
            // and what the app sends now waits behind them.
            this.setStatus("open");
            return;
        }
        this.ready(attempt);
    }
    /** Messages go straight out on `attempt` from now on; what waited goes first. */
    ready(attempt) {
        attempt.ready = true;
        this.flush(attempt);
        this.setStatus("open");
    }
    ended(attempt, info) {
        this.detach(attempt);
        this.stopResyncRetry();
        // Reconnecting, each attempt has its own timeout; a first connection's
        // covers its fallback too (`connect(token, timeoutMs)` is one deadline).
        if (this.lost)
            this.stopAttemptTimer();
        if (this.duplicateOfFallback(attempt, info)) {
            this.duplicateRetries++;
            this.setStatus(this.lost ? "reconnecting" : "connecting");
            if (this.over)
                return; // the app closed from its onStatus
            this.wait(this.fallbackRetryMs, info, () => {
                this.dial("v1");
                this.startAttemptTimer(this.lost ? this.reconnectOptions.attemptTimeoutMs : this.connectTimeoutMs);
            });
        }
        else if (this.closing) {
            this.finish(this.closeRequest ?? info);
        }
        else if (!attempt.open && attempt.wanted === "v2" && this.mayFallBack()) {
            // Browsers (and Node's WebSocket, and the `ws` package) FAIL a handshake
            // whose answer lacks an offered subprotocol, which is what a v1 server
            // that does not echo the offer sends: try once more without the offer.
            this.fallbacks++;
            try {
                attempt.ws.close();
            }
            catch {
                // already closed
            }
            this.dial("v1");
            if (this.lost)
                this.startAttemptTimer(this.reconnectOptions.attemptTimeoutMs);
        }
        else if (!attempt.open) {
            this.attemptFailed(info);
        }
        else if (this.reconnectOptions && RECONNECT_CODES.includes(info.code)) {
            this.reconnect(info);
        }
        else {
            this.finish(info);
        }
    }
    // A v2 attempt that fails before it opens is retried at once without the
    // offer on a first connection, or when the room's server may be of another
    // kind: the last socket fell back, or `resolve` moved the room. Otherwise,
    // reconnecting to the server that spoke v2 or echoed the offer, a failure is
    // the server still being down: one socket per attempt, not two.
    mayFallBack() {
        return !this.lost || this.lastFellBack || this.movedThisSeries;
    }
    // After a fallback, the server may still hold the failed v2 attempt (an
    // older server behind a slow proxy sees its close late) and turn the v1
    // connection away as a duplicate of it: one more v1 attempt, a little later.
    duplicateOfFallback(attempt, info) {
        return (attempt.wanted === "v1" &&
            this.fallbacks > 0 &&
            this.duplicateRetries === 0 &&
            !this.closing &&
            info.code === 1008 &&
            info.reason === "Duplicate user" &&
            (!attempt.open || Date.now() - attempt.openedAt < DUPLICATE_AFTER_FALLBACK_MS));
    }
    // --- reconnecting --------------------------------------------------------
    /** An open socket closed with a code that says "come back". */
    reconnect(info) {
        // Lost again before the room came back: the same series (its backoff goes on).
        if (!this.lost) {
            const now = Date.now();
            const flapping = this.cameBack !== null && now - this.cameBack.at < STABLE_AFTER_MS;
            this.lost = { since: now, failures: flapping ? this.cameBack.failures : 0, info };
            this.movedThisSeries = false;
            this.duplicateRetries = 0;
            this.giveUpTimer = timers.setTimeout(() => {
                this.giveUpTimer = null;
                this.giveUp();
            }, this.reconnectOptions.giveUpAfterMs);
        }
        this.setStatus("reconnecting");
        if (this.over)
            return; // the app closed from its onStatus
        this.scheduleAttempt();
    }
    /** The connection has ended, or the app has closed it. */
    get over() {
        return this.closeInfo !== null || this.closing;
    }
    /** The room is back on `attempt` (its first frame): the series ends. */
    cameBackOn(attempt) {
        const lost = this.lost;
        this.stopAttemptTimer();
        this.stopGiveUpTimer();
        this.cameBack = { at: Date.now(), failures: lost.failures };
        this.lost = null;
        this.duplicateRetries = 0;
        this.stats.reconnects++;
        this.ready(attempt);
    }
    /** No attempt brought the room back in time: the connection ends with the close that started the series. */
    giveUp() {
        const lost = this.lost;
        if (!lost || this.closeInfo)
            return;
        const attempt = this.attempt;
        if (attempt) {
            this.detach(attempt);
            abandon(attempt.ws);
        }
        this.finish(lost.info);
    }
    stopGiveUpTimer() {
        if (this.giveUpTimer !== null)
            timers.clearTimeout(this.giveUpTimer);
        this.giveUpTimer = null;
    }
    /** An attempt failed before it opened (or timed out). */
    attemptFailed(info) {
        this.stopAttemptTimer();
        if (this.over)
            return;
        if (this.lost)
            this.scheduleAttempt();
        else
            this.finish(info); // the first connection never opened: `opened` rejects
    }
    scheduleAttempt() {
        const lost = this.lost;
        const settings = this.reconnectOptions;
        const ceiling = Math.min(settings.maxDelayMs, settings.initialDelayMs * 2 ** Math.min(lost.failures, 30));
        const delay = ceiling * (0.5 + Math.random() / 2);
        lost.failures++;
        if (Date.now() + delay - lost.since > settings.giveUpAfterMs) {
            this.giveUp();
            return;
        }
        this.wait(delay, lost.info, () => {
            this.redial().catch((error) => this.report(error));
        });
    }
    async redial() {
        const lost = this.lost;
        // The first attempt reuses the URL; once it failed, ask for a new one.
        if (lost.failures > 1 && this.options.resolve) {
            let url;
            try {
                url = await this.options.resolve();
            }
            catch {
                if (!this.closing && !this.closeInfo)
                    this.scheduleAttempt();
                return;
            }
            if (this.closing || this.closeInfo || this.lost !== lost)
                return;
            if (typeof url !== "string" || url === "") {
                this.scheduleAttempt(); // nothing usable: a failed attempt
                return;
            }
            if (url !== this.url)
                this.movedThisSeries = true;
            this.url = url;
        }
        try {
            this.dial(this.preferred);
        }
        catch {
            this.scheduleAttempt(); // a URL the WebSocket refuses
            return;
        }
        this.startAttemptTimer(this.reconnectOptions.attemptTimeoutMs);
    }
    wait(ms, info, then) {
        const timer = timers.setTimeout(() => {
            this.waiting = null;
            then();
        }, ms);
        this.waiting = { timer, info };
    }
    startAttemptTimer(ms) {
        this.stopAttemptTimer();
        if (!(ms > 0))
            return;
        this.attemptTimer = timers.setTimeout(() => {
            this.attemptTimer = null;
            const attempt = this.attempt;
            if (!attempt || attempt.ready)
                return;
            this.detach(attempt);
            abandon(attempt.ws);
            this.attemptFailed({ code: 1006, reason: `connect timeout after ${ms} ms`, wasClean: false });
        }, ms);
    }
    stopAttemptTimer() {
        if (this.attemptTimer !== null)
            timers.clearTimeout(this.attemptTimer);
        this.attemptTimer = null;
    }
    /** The connection ends for good. */
    finish(info) {
        if (this.closeInfo)
            return;
        if (this.attempt)
            this.detach(this.attempt);
        if (this.waiting)
            timers.clearTimeout(this.waiting.timer);
        this.waiting = null;
        this.stopAttemptTimer();
        this.stopGiveUpTimer();
        this.stopResyncRetry();
        // Not sent: kept for the app (`unsent`), e.g. for the next connection's `pending`.
        this.unsentMessages = this.queuedCursor ? [...this.queue, this.queuedCursor] : this.queue;
        this.queue = [];
        this.queuedCursor = null;
        this.lost = null;
        this.closeInfo = info;
        this.setStatus("closed");
        this.settleOpened.reject(new Error(`closed before it opened: ${info.code} ${info.reason}`));
        this.settleClosed(info);
        try {
            this.options.onClose?.(info);
        }
        catch (error) {
            this.report(error);
        }
    }
    /** Hands what an app callback threw to `onError` (which must not throw either). */
    report(error) {
        try {
            this.onError(error);
        }
        catch {
            // an onError that throws: nothing more to do
        }
    }
    setStatus(status) {
        if (this.status === status)
            return;
        this.status = status;
        try {
            this.options.onStatus?.(status);
        }
        catch (error) {
            this.report(error);
        }
    }
    // --- messages ------------------------------------------------------------
    write(attempt, message) {
        attempt.ws.send(JSON.stringify(message));
        this.stats.sent++;
    }
    enqueue(message) {
        if (message.type === "resync")
            return false;
        if (message.type === "cursor_move") {
            this.queuedCursor = message;
            return true;
        }
        if (message.type === "shape_update") {
            // Updates of different shapes commute: one waiting update per shape (a
            // drag of two shapes at once stays two messages), up to a delete of it.
            for (let i = this.queue.length - 1; i >= 0; i--) {
                const waiting = this.queue[i];
                if (waiting.type === "shape_delete" && waiting.shapeId === message.shapeId)
                    break;
                if (waiting.type === "shape_update" && waiting.shapeId === message.shapeId) {
                    const merged = { ...waiting };
                    for (const [key, value] of Object.entries(message))
                        if (value !== undefined)
                            merged[key] = value;
                    this.queue[i] = merged;
                    return true;
                }
            }
        }
        if (this.queue.length >= this.reconnectOptions.maxQueued) {
            this.stats.queueFull++;
            return false;
        }
        this.queue.push(message);
        return true;
    }
    /** What waited while reconnecting goes out on the new socket: shape ops in order, then the newest cursor. */
    flush(attempt) {
        const queued = this.queue;
        const cursor = this.queuedCursor;
        this.queue = [];
        this.queuedCursor = null;
        for (const message of queued)
            this.write(attempt, message);
        if (cursor)
            this.write(attempt, cursor);
    }
    receive(attempt, data) {
        if (typeof data !== "string") {
            this.stats.lastProblem = "binary frame";
            return;
        }
        if (attempt.sniffing) {
            attempt.sniffing = false;
            if (isV1Snapshot(data)) {
                this.protocol = "v1";
                this.stats.v1ByContent++;
            }
        }
        if (!attempt.heard) {
            attempt.heard = true;
            if (this.lost)
                this.cameBackOn(attempt);
            else if (!attempt.ready)
                this.ready(attempt);
            if (this.attempt !== attempt)
                return; // the app closed from its onStatus
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
                    this.report(error);
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
    return new RoomConnection(url, options);
}
/**
 * What connections that ended for good left unsent, by room and user: the
 * app's Reconnect makes a new `SessionClient` for the same room, whose
 * connection sends them first. In this page's memory only, and for
 * `LEFTOVERS_KEPT_MS`: older edits would overwrite what others did since.
 */
const leftovers = new Map();
const LEFTOVERS_KEPT_MS = 5 * 60000;
/** The room and user a token names (read, not verified: the server does that), or null. */
function sessionKey(token) {
    try {
        const decode = globalThis.atob;
        const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
        const claims = JSON.parse(decode(payload));
        return typeof claims.roomId === "string" && typeof claims.userId === "string"
            ? `${claims.roomId}\n${claims.userId}`
            : null;
    }
    catch {
        return null;
    }
}
/** The public client's default `fill` and `stroke` for a new shape (PROTOCOL.md §3). */
const DEFAULT_FILL = "#3b82f6";
const DEFAULT_STROKE = "#1d4ed8";
/**
 * The public React client's session class (`client/src/sessionClient.ts`), with
 * the same surface, over `RoomConnection`: switching is one changed import (or
 * this file copied over that one). What differs is what a user sees: it speaks
 * v2 where the server does, and it comes back by itself after a server restart
 * or a lost network (see `RECONNECT_CODES`), calling `onClose` only when the
 * connection ends for good.
 */
export class SessionClient {
    constructor(host, options = {}) {
        this.connection = null;
        this.messageCallback = null;
        this.closeCallback = null;
        this.statusCallback = null;
        this.host = host;
        this.options = options;
        this.statusCallback = options.onStatus ?? null;
    }
    static create(host, options = {}) {
        return new SessionClient(host, options);
    }
    /** Where the connection is; "closed" before `connect`. */
    get status() {
        return this.connection?.status ?? "closed";
    }
    /** The protocol of the current socket ("v2" or "v1"), null before the first. */
    get protocol() {
        return this.connection?.protocol ?? null;
    }
    /** The connection underneath (null before `connect`): its `state`, `stats`, `subscribe`. */
    get room() {
        return this.connection;
    }
    /**
     * Opens `ws(s)://host/?token=…`. Resolves when the socket opens; rejects when
     * it fails first, or is still not open after `timeoutMs` (then nothing is
     * left open). A connection that never opened does not call `onClose`.
     */
    connect(token, timeoutMs = 30000) {
        const previous = this.connection;
        this.connection = null;
        previous?.close(); // a second connect replaces the first, without its onClose
        const secure = this.options.secure ?? globalThis.location?.protocol === "https:";
        const url = (host, token) => `${secure ? "wss" : "ws"}://${host}/?token=${token}`;
        const resolveUrl = this.options.resolve;
        const key = sessionKey(token);
        const left = key === null ? undefined : leftovers.get(key);
        const pending = left && Date.now() - left.at < LEFTOVERS_KEPT_MS ? left.messages : undefined;
        if (key !== null)
            leftovers.delete(key);
        let opened = false;
        return new Promise((resolve, reject) => {
            const connection = new RoomConnection(url(this.host, token), {
                protocol: this.options.protocol,
                WebSocket: this.options.WebSocket,
                reconnect: this.options.reconnect,
                connectTimeoutMs: timeoutMs,
                pending,
                resolve: resolveUrl
                    ? async () => {
                        const next = await resolveUrl();
                        if (typeof next?.host !== "string" || next.host === "" || typeof next.token !== "string") {
                            throw new Error("resolve() gave no host and token");
                        }
                        this.host = next.host;
                        return url(next.host, next.token);
                    }
                    : undefined,
                onChange: (state) => {
                    if (this.connection === connection)
                        this.messageCallback?.(state);
                },
                onStatus: (status) => {
                    if (status === "open" && !opened) {
                        opened = true;
                        resolve();
                    }
                    if (this.connection === connection)
                        this.statusCallback?.(status);
                },
                onClose: (info) => {
                    if (key !== null && connection.unsent.length > 0) {
                        leftovers.set(key, { at: Date.now(), messages: connection.unsent });
                    }
                    if (!opened) {
                        reject(new Error(info.reason.startsWith("connect timeout")
                            ? `WebSocket connection timeout after ${timeoutMs}ms`
                            : `WebSocket connection failed (${info.code}${info.reason ? ` ${info.reason}` : ""})`));
                    }
                    else if (this.connection === connection) {
                        this.closeCallback?.();
                    }
                },
            });
            this.connection = connection;
        });
    }
    /**
     * `callback` gets the room as a v1 snapshot at every change (the first
     * snapshot, and after a reconnect the new first one). Type it as your app
     * types its snapshots: timestamps are ISO strings, as the server sends them.
     */
    onMessage(callback) {
        this.messageCallback = callback;
    }
    /** `callback` is called once when the connection ends for good (not while it reconnects). */
    onClose(callback) {
        this.closeCallback = callback;
    }
    /** `callback` is called at every change of `status` (not in the public client: for a "reconnecting" banner). */
    onStatus(callback) {
        this.statusCallback = callback;
    }
    sendCursorMove(x, y) {
        return this.send({ type: "cursor_move", x, y });
    }
    sendShapeCreate(shapeType, x, y, width, height, options = {}) {
        return this.send({
            type: "shape_create",
            shapeType,
            x,
            y,
            width,
            height,
            text: options.text,
            fill: options.fill || DEFAULT_FILL,
            stroke: options.stroke || DEFAULT_STROKE,
        });
    }
    sendShapeUpdate(shapeId, updates) {
        return this.send({ type: "shape_update", shapeId, ...updates });
    }
    sendShapeDelete(shapeId) {
        return this.send({ type: "shape_delete", shapeId });
    }
    /** Closes the connection for good (`onClose` is called if it had opened). */
    close() {
        this.connection?.close();
    }
    /** Sent at once when open, queued while reconnecting; otherwise a warning and false, as the public client. */
    send(message) {
        if (this.connection?.send(message))
            return true;
        globalThis.console?.warn(this.connection?.status === "reconnecting"
            ? "Cannot send message: too many messages wait for the reconnection"
            : "Cannot send message: socket not connected");
        return false;
    }
}
