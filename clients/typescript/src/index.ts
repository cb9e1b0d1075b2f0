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

// ---------------------------------------------------------------------------
// The room, exactly as a v1 snapshot holds it.

/** The shape types the clients draw. */
export type ShapeType = "rectangle" | "oval" | "text" | "line" | "arrow";

export interface Cursor {
  userId: string;
  x: number;
  y: number;
  /** ISO 8601 UTC with milliseconds. */
  timestamp: string;
}

export interface Shape {
  id: string;
  type: ShapeType;
  x: number;
  y: number;
  width: number;
  height: number;
  userId: string;
  timestamp: string;
  text?: string;
  fill: string;
  stroke: string;
  rotation: number;
}

/**
 * A v1 snapshot: users in join order, cursors in first-move order, shapes in
 * creation order. The client never mutates a state it has handed out: every
 * change produces a new object (and new arrays for what changed), so
 * `prev !== next` is a valid change test (React's `useSyncExternalStore`).
 * The arrays are `readonly` because they are shared (with the previous and the
 * next state); a v1 snapshot type with mutable arrays does not accept them
 * (TypeScript never lets a readonly array pass for a mutable one): declare
 * its arrays `readonly` too, or copy (`[...state.shapes]`) what you mean to modify.
 */
export interface RoomState {
  readonly connectedUsers: readonly string[];
  readonly cursors: readonly Cursor[];
  readonly shapes: readonly Shape[];
}

/** The protocol a connection speaks, known once it is open. */
export type Protocol = "v1" | "v2";

/** The WebSocket subprotocol that asks for v2. */
export const SUBPROTOCOL_V2 = "whiteboard.v2";

// ---------------------------------------------------------------------------
// v2 server messages (PROTOCOL-v2.md §2).

export type Op =
  | { op: "join"; userId: string }
  | { op: "leave"; userId: string }
  | { op: "cursor"; userId: string; x: number; y: number; timestamp: string }
  | { op: "add"; shape: Shape }
  | { op: "update"; id: string; set: Partial<Omit<Shape, "id">> }
  | { op: "remove"; id: string };

export interface SnapshotMessage extends RoomState {
  type: "snapshot";
  seq: number;
}

export interface OpsMessage {
  type: "ops";
  seq: number;
  ops: Op[];
}

// ---------------------------------------------------------------------------
// Client messages (PROTOCOL.md §3, PROTOCOL-v2.md §3).

export interface NewShape {
  shapeType: ShapeType;
  x: number;
  y: number;
  width: number;
  height: number;
  text?: string;
  fill?: string;
  stroke?: string;
}

export interface ShapeChanges {
  x?: number;
  y?: number;
  width?: number;
  height?: number;
  rotation?: number;
  text?: string;
  fill?: string;
  stroke?: string;
}

export type ClientMessage =
  | { type: "cursor_move"; x: number; y: number }
  | ({ type: "shape_create" } & NewShape)
  | ({ type: "shape_update"; shapeId: string } & ShapeChanges)
  | { type: "shape_delete"; shapeId: string }
  | { type: "resync" };

// ---------------------------------------------------------------------------
// The apply logic: pure, no I/O.

/** What a connection knows about the room. Never mutated: replaced. */
export interface SyncState {
  readonly state: RoomState;
  /** The `seq` of the last snapshot or batch applied (v2); null before the first snapshot and in v1. */
  readonly lastSeq: number | null;
  /** A resync was asked for: `ops` are ignored until the next snapshot (v2). */
  readonly awaitingSnapshot: boolean;
}

export interface ApplyResult {
  /** The sync state after the frame (the same object when nothing changed). */
  sync: SyncState;
  /** `sync.state` is a new room state. */
  changed: boolean;
  /** Send `{"type":"resync"}` now (true once per gap, not for every ignored batch). */
  resync: boolean;
  /** Why the frame was not applied, when it was not. */
  problem?: string;
  /** v2 `error`: messages of this client a room limit refused (PROTOCOL-v2.md). */
  refused?: Refused;
}

/** What a v2 `error` message says: `count` messages refused, the last a `op`, for `reason`. */
export interface Refused {
  /** The refused message's `type` (`shape_create`, `shape_update`). */
  op: string;
  /** `board_full`, `shape_limit` or `memory_full`. */
  reason: string;
  /** How many since the last `error`. */
  count: number;
}

/** An empty room, frozen all the way down (its arrays too): for comparisons. */
export const EMPTY_ROOM: RoomState = Object.freeze({
  connectedUsers: Object.freeze([] as string[]),
  cursors: Object.freeze([] as Cursor[]),
  shapes: Object.freeze([] as Shape[]),
});

/**
 * The sync state of a connection before its first message: a new empty room
 * every time, so that no two clients share (and a careless `push` on one
 * cannot change) a starting state.
 */
export function initialSync(): SyncState {
  return { state: { connectedUsers: [], cursors: [], shapes: [] }, lastSeq: null, awaitingSnapshot: false };
}

type Json = Record<string, unknown>;

const isObject = (v: unknown): v is Json =>
  typeof v === "object" && v !== null && !Array.isArray(v);
const isString = (v: unknown): v is string => typeof v === "string";
const isNumber = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v);
const isSeq = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) >= 0;

function roomOf(msg: Json): RoomState | null {
  const { connectedUsers, cursors, shapes } = msg;
  if (!Array.isArray(connectedUsers) || !Array.isArray(cursors) || !Array.isArray(shapes)) {
    return null;
  }
  return {
    connectedUsers: connectedUsers as string[],
    cursors: cursors as Cursor[],
    shapes: shapes as Shape[],
  };
}

/**
 * Applies one batch of v2 ops to a room, in order. Returns the new room, or
 * the reason the batch cannot be applied (an op naming a user or shape the
 * room does not have, or one that would make it differ from any v1 snapshot:
 * a second join of a connected user, a second shape with one id). The input
 * is not modified.
 */
export function applyOps(room: RoomState, ops: readonly unknown[]): RoomState | { error: string } {
  let users: string[] | null = null;
  let cursors: Cursor[] | null = null;
  let shapes: Shape[] | null = null;
  const u = () => (users ??= room.connectedUsers.slice());
  const c = () => (cursors ??= room.cursors.slice());
  const s = () => (shapes ??= room.shapes.slice());
  const connected = (id: string) => (users ?? room.connectedUsers).includes(id);
  const shapeIndex = (id: string) => (shapes ?? room.shapes).findIndex((x) => x.id === id);

  for (let i = 0; i < ops.length; i++) {
    const op = ops[i];
    const at = `op ${i}`;
    if (!isObject(op)) return { error: `${at} is not an object` };
    switch (op.op) {
      case "join": {
        if (!isString(op.userId)) return { error: `${at}: join without a userId` };
        if (connected(op.userId)) return { error: `${at}: join of ${op.userId}, already connected` };
        u().push(op.userId);
        break;
      }
      case "leave": {
        if (!isString(op.userId)) return { error: `${at}: leave without a userId` };
        const index = (users ?? room.connectedUsers).indexOf(op.userId);
        if (index < 0) return { error: `${at}: leave of unknown user ${op.userId}` };
        u().splice(index, 1);
        const cursor = (cursors ?? room.cursors).findIndex((x) => x.userId === op.userId);
        if (cursor >= 0) c().splice(cursor, 1);
        break;
      }
      case "cursor": {
        const { userId, x, y, timestamp } = op;
        if (!isString(userId) || !isNumber(x) || !isNumber(y) || !isString(timestamp)) {
          return { error: `${at}: cursor without userId, x, y and timestamp` };
        }
        if (!connected(userId)) return { error: `${at}: cursor of unknown user ${userId}` };
        const cursor: Cursor = { userId, x, y, timestamp };
        const index = (cursors ?? room.cursors).findIndex((x) => x.userId === userId);
        if (index < 0) c().push(cursor);
        else c()[index] = cursor;
        break;
      }
      case "add": {
        const shape = op.shape;
        if (!isObject(shape) || !isString(shape.id)) return { error: `${at}: add without a shape` };
        if (shapeIndex(shape.id) >= 0) return { error: `${at}: add of ${shape.id}, already there` };
        s().push({ ...shape } as unknown as Shape);
        break;
      }
      case "update": {
        if (!isString(op.id) || !isObject(op.set)) return { error: `${at}: update without id and set` };
        const index = shapeIndex(op.id);
        if (index < 0) return { error: `${at}: update of unknown shape ${op.id}` };
        const list = s();
        // `id` names the shape: an `id` in `set` is ignored (the rest applies).
        const { id: _ignored, ...set } = op.set;
        void _ignored;
        list[index] = { ...list[index], ...set } as Shape;
        break;
      }
      case "remove": {
        if (!isString(op.id)) return { error: `${at}: remove without an id` };
        const index = shapeIndex(op.id);
        if (index < 0) return { error: `${at}: remove of unknown shape ${op.id}` };
        s().splice(index, 1);
        break;
      }
      default:
        return { error: `${at}: unknown op ${JSON.stringify(op.op)}` };
    }
  }
  if (!users && !cursors && !shapes) return room;
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
export function applyFrame(sync: SyncState, data: string, protocol: Protocol): ApplyResult {
  let msg: unknown;
  try {
    msg = JSON.parse(data);
  } catch {
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
    if (!room) return { sync, changed: false, resync: false, problem: "not a snapshot" };
    return { sync: { state: room, lastSeq: null, awaitingSnapshot: false }, changed: true, resync: false };
  }

  switch (msg.type) {
    case "snapshot": {
      const room = roomOf(msg);
      if (!room || !isSeq(msg.seq)) return askResync(sync, "snapshot without seq and room");
      return { sync: { state: room, lastSeq: msg.seq, awaitingSnapshot: false }, changed: true, resync: false };
    }
    case "ops": {
      if (sync.awaitingSnapshot) {
        return { sync, changed: false, resync: false, problem: "ops while waiting for a snapshot" };
      }
      if (!isSeq(msg.seq) || !Array.isArray(msg.ops)) return askResync(sync, "ops without seq and ops");
      if (sync.lastSeq === null) return askResync(sync, `ops seq ${msg.seq} before any snapshot`);
      if (msg.seq !== sync.lastSeq + 1) {
        return askResync(sync, `gap: ops seq ${msg.seq} after ${sync.lastSeq}`);
      }
      const room = applyOps(sync.state, msg.ops);
      if ("error" in room) return askResync(sync, `ops seq ${msg.seq}: ${room.error}`);
      return {
        sync: { state: room, lastSeq: msg.seq, awaitingSnapshot: false },
        changed: room !== sync.state,
        resync: false,
      };
    }
    case "error": {
      // Outside the seq order, no state: counted, nothing else.
      const { op, reason, count } = msg as { op?: unknown; reason?: unknown; count?: unknown };
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

function askResync(sync: SyncState, problem: string): ApplyResult {
  if (sync.awaitingSnapshot) return { sync, changed: false, resync: false, problem };
  return { sync: { ...sync, awaitingSnapshot: true }, changed: false, resync: true, problem };
}

// ---------------------------------------------------------------------------
// The connection.

/** What the client needs of a WebSocket (the browser's, Node's, or the `ws` package's). */
export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** A WebSocket constructor, called as `new WebSocket(url, protocols)`. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface CloseInfo {
  code: number;
  reason: string;
  wasClean: boolean;
}

export interface ConnectOptions {
  /**
   * "v2" (the default) offers `whiteboard.v2`; when that attempt fails before it
   * opens (a v1 server answers without the subprotocol, which WebSocket
   * implementations treat as a failed handshake), one more attempt offers nothing
   * and the connection is v1. "v1" offers nothing (v1 only, for comparison).
   */
  protocol?: Protocol;
  /** The WebSocket to use; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** Called after every change of `state`. */
  onChange?: (state: RoomState) => void;
  /** Called once when the connection closes (also when it never opened). */
  onClose?: (info: CloseInfo) => void;
  /**
   * Called with what a change listener (`onChange`, `subscribe`) threw; the
   * other listeners are still called. Default: `console.error`.
   */
  onError?: (error: unknown) => void;
  /**
   * v2: when a resync the client asked for brings no snapshot within this many
   * milliseconds (the request or the answer was lost), it asks again, at most
   * once per period, until a snapshot arrives. Default 2000.
   */
  resyncRetryMs?: number;
  /**
   * After a fallback to v1, a `1008 Duplicate user` within 2 s of the v1
   * connection opening is most likely the server still holding the failed v2
   * attempt (an older server behind a slow proxy): the client connects once
   * more, this many milliseconds later. Default 1000; a real duplicate gets its
   * 1008 again on that attempt, and the connection closes with it.
   */
  fallbackRetryMs?: number;
}

/** How soon after the fallback connection opens a `1008 Duplicate user` counts as its own echo. */
const DUPLICATE_AFTER_FALLBACK_MS = 2000;

/** Counters, for tests and the curious. */
export interface ClientStats {
  /** Text frames received. */
  frames: number;
  /** Changes of `state`. */
  changes: number;
  /** Resync requests sent (by the client after a gap, or by `resync()`). */
  resyncs: number;
  /** Messages sent (resyncs included). */
  sent: number;
  /** The last frame that was not applied, and why. */
  lastProblem: string | null;
  /** This client's messages a room limit refused (v2 `error` messages). */
  refused: number;
}

const OPEN = 1;

/** The close codes a browser lets a page send (others throw): 1000 and 3000-4999. */
export function validCloseCode(code: number | undefined): number {
  return code === 1000 || (Number.isInteger(code) && (code as number) >= 3000 && (code as number) <= 4999)
    ? (code as number)
    : 1000;
}

// The ES2020 lib declares no timers; every runtime the client runs in has them.
type TimerId = number | { unref?(): void };
const timers = globalThis as unknown as {
  setTimeout(callback: () => void, ms: number): TimerId;
  clearTimeout(id: TimerId): void;
};

function reportError(error: unknown): void {
  (globalThis as { console?: { error(...data: unknown[]): void } }).console?.error(
    "session client: a change listener threw",
    error,
  );
}

/**
 * One connection to a room. `state` is the room as a v1 snapshot; it starts
 * empty and changes with every message (see `subscribe`). No reconnection: a
 * closed client stays closed (make a new one), as the public React client does.
 */
export class SessionClient {
  /** "v2" or "v1" once open; null before. */
  protocol: Protocol | null = null;
  /** How the connection closed; null while it is open or opening. */
  closeInfo: CloseInfo | null = null;
  /** Resolves with the protocol when the connection opens; rejects if it closes first. */
  readonly opened: Promise<Protocol>;
  /** Resolves when the connection closes. */
  readonly closed: Promise<CloseInfo>;
  readonly stats: ClientStats = { frames: 0, changes: 0, resyncs: 0, sent: 0, lastProblem: null, refused: 0 };

  /** Attempts that offered v2 and failed before opening, then retried as v1 (0 or 1). */
  fallbacks = 0;
  /** v1 connections made again after a `1008 Duplicate user` right after the fallback (0 or 1). */
  duplicateRetries = 0;

  private sync: SyncState = initialSync();
  private ws!: WebSocketLike;
  private closing = false;
  /** A retry after a duplicate waiting for its timer: close() ends it at once. */
  private pendingRetry: { timer: TimerId; giveUp: () => void } | null = null;
  private readonly listeners = new Set<(state: RoomState) => void>();
  private readonly onError: (error: unknown) => void;
  private readonly resyncRetryMs: number;
  private resyncTimer: TimerId | null = null;

  constructor(url: string, options: ConnectOptions = {}) {
    const Ctor =
      options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!Ctor) {
      throw new Error("no WebSocket: pass options.WebSocket (e.g. the `ws` package's) where there is no global one");
    }
    if (options.onChange) this.listeners.add(options.onChange);
    this.onError = options.onError ?? reportError;
    this.resyncRetryMs = options.resyncRetryMs ?? 2000;
    const fallbackRetryMs = options.fallbackRetryMs ?? 1000;
    let opened!: (p: Protocol) => void;
    let failed!: (e: Error) => void;
    let closed!: (info: CloseInfo) => void;
    this.opened = new Promise((resolve, reject) => ((opened = resolve), (failed = reject)));
    this.opened.catch(() => {}); // a caller that never awaits it must not see an unhandled rejection
    this.closed = new Promise((resolve) => (closed = resolve));

    const finish = (info: CloseInfo) => {
      if (this.closeInfo) return;
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
    const attempt = (wanted: Protocol): WebSocketLike => {
      const ws = wanted === "v2" ? new Ctor(url, [SUBPROTOCOL_V2]) : new Ctor(url);
      this.ws = ws;
      let open = false;
      let openedAt = 0;
      let done = false;
      // Handlers as properties: every WebSocket implementation has them.
      const handlers = ws as unknown as {
        onopen: (() => void) | null;
        onmessage: ((event: { data: unknown }) => void) | null;
        onclose: ((event: { code: number; reason: string; wasClean: boolean }) => void) | null;
        onerror: (() => void) | null;
      };
      // After a fallback, the server may still hold the failed v2 attempt (an
      // older server behind a slow proxy sees its close late) and turn the v1
      // connection away as a duplicate of it: one more v1 attempt, a little later.
      const duplicateOfFallback = (info: CloseInfo) =>
        wanted === "v1" &&
        this.fallbacks > 0 &&
        this.duplicateRetries === 0 &&
        !this.closing &&
        info.code === 1008 &&
        info.reason === "Duplicate user" &&
        (!open || Date.now() - openedAt < DUPLICATE_AFTER_FALLBACK_MS);
      const retryLater = (info: CloseInfo) => {
        this.duplicateRetries++;
        const timer = timers.setTimeout(() => {
          this.pendingRetry = null;
          attempt("v1");
        }, fallbackRetryMs);
        this.pendingRetry = { timer, giveUp: () => finish(info) };
      };
      const failedBeforeOpen = (info: CloseInfo) => {
        if (done) return;
        done = true;
        handlers.onopen = handlers.onmessage = handlers.onclose = handlers.onerror = null;
        if (duplicateOfFallback(info)) {
          retryLater(info);
        } else if (wanted === "v2" && !this.closing) {
          this.fallbacks++;
          try {
            ws.close();
          } catch {
            // already closed
          }
          attempt("v1");
        } else {
          finish(info);
        }
      };
      handlers.onopen = () => {
        if (done) return;
        open = true;
        openedAt = Date.now();
        this.protocol = wanted === "v2" && ws.protocol === SUBPROTOCOL_V2 ? "v2" : "v1";
        opened(this.protocol);
      };
      handlers.onmessage = (event) => {
        if (open && !done) this.receive(event.data);
      };
      // Before it opens, an error is a failed handshake (Node 20's WebSocket sends
      // no close event after it); after, a close event follows.
      handlers.onerror = () => {
        if (!open) failedBeforeOpen({ code: 1006, reason: "", wasClean: false });
      };
      handlers.onclose = (event) => {
        const info = { code: event.code, reason: event.reason, wasClean: event.wasClean };
        if (!open) return failedBeforeOpen(info);
        if (done) return;
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
  get state(): RoomState {
    return this.sync.state;
  }

  /** The `seq` of the last v2 message applied (null in v1 and before the first snapshot). */
  get lastSeq(): number | null {
    return this.sync.lastSeq;
  }

  /** Same as `state`, for `useSyncExternalStore(client.subscribe, client.getState)`. */
  getState = (): RoomState => this.sync.state;

  /** Calls `listener` after every change of `state`; returns the unsubscribe function. */
  subscribe = (listener: (state: RoomState) => void): (() => void) => {
    this.listeners.add(listener);
    return () => {
      this.listeners.delete(listener);
    };
  };

  /** Whether the connection is open (the send helpers return false when it is not). */
  get isOpen(): boolean {
    return this.ws.readyState === OPEN;
  }

  moveCursor(x: number, y: number): boolean {
    return this.send({ type: "cursor_move", x, y });
  }

  createShape(shape: NewShape): boolean {
    return this.send({ type: "shape_create", ...shape });
  }

  updateShape(shapeId: string, changes: ShapeChanges): boolean {
    return this.send({ type: "shape_update", ...changes, shapeId });
  }

  deleteShape(shapeId: string): boolean {
    return this.send({ type: "shape_delete", shapeId });
  }

  /** Asks a v2 server for a fresh snapshot (a v1 server ignores it). */
  resync(): boolean {
    const sent = this.send({ type: "resync" });
    if (sent) this.stats.resyncs++;
    return sent;
  }

  /** Sends any client message; false (and nothing sent) when the connection is not open. */
  send(message: ClientMessage): boolean {
    if (this.ws.readyState !== OPEN) return false;
    this.ws.send(JSON.stringify(message));
    this.stats.sent++;
    return true;
  }

  /**
   * Closes the connection. A code a browser would refuse (anything but 1000 and
   * 3000-4999: it throws and the socket stays open) becomes 1000.
   */
  close(code?: number, reason?: string): void {
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
    } catch {
      // A reason a browser refuses (over 123 bytes of UTF-8): close without it.
      this.ws.close(valid);
    }
  }

  private receive(data: unknown): void {
    if (typeof data !== "string") {
      this.stats.lastProblem = "binary frame";
      return;
    }
    this.stats.frames++;
    const result = applyFrame(this.sync, data, this.protocol ?? "v1");
    this.sync = result.sync;
    if (result.problem) this.stats.lastProblem = result.problem;
    if (result.refused) this.stats.refused += result.refused.count;
    if (result.resync) {
      this.resync();
      this.startResyncRetry();
    }
    if (!this.sync.awaitingSnapshot) this.stopResyncRetry();
    if (result.changed) {
      this.stats.changes++;
      const state = this.sync.state;
      // Each listener on its own: one that throws neither skips the others nor
      // escapes into the WebSocket's message handler.
      for (const listener of [...this.listeners]) {
        try {
          listener(state);
        } catch (error) {
          try {
            this.onError(error);
          } catch {
            // an onError that throws: nothing more to do
          }
        }
      }
    }
  }

  // A resync the client asked for may be lost (or its answer): until a
  // snapshot arrives, ask again every `resyncRetryMs`.
  private startResyncRetry(): void {
    if (this.resyncTimer !== null || this.closeInfo || this.closing) return;
    const retry = () => {
      this.resyncTimer = null;
      if (!this.sync.awaitingSnapshot || this.closeInfo || this.closing) return;
      this.resync();
      this.resyncTimer = timers.setTimeout(retry, this.resyncRetryMs);
    };
    this.resyncTimer = timers.setTimeout(retry, this.resyncRetryMs);
  }

  private stopResyncRetry(): void {
    if (this.resyncTimer !== null) timers.clearTimeout(this.resyncTimer);
    this.resyncTimer = null;
  }
}

/** Opens a connection: `url` is the server's WebSocket URL with the token (`wss://host/?token=…`). */
export function connect(url: string, options: ConnectOptions = {}): SessionClient {
  return new SessionClient(url, options);
}
