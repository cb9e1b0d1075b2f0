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

/**
 * Whether a frame is a v1 snapshot (an object with the three arrays and no
 * `type`). A server that echoes every offered subprotocol but speaks v1 (the
 * Node.js server's `ws` does) is found by its first frame being one.
 */
export function isV1Snapshot(data: string): boolean {
  let msg: unknown;
  try {
    msg = JSON.parse(data);
  } catch {
    return false;
  }
  return isObject(msg) && msg.type === undefined && roomOf(msg) !== null;
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

/**
 * Where a connection is: `connecting` (the first time), `open`, `reconnecting`
 * (it was open, closed unexpectedly, and the client is getting it back), and
 * `closed` (for good).
 */
export type ConnectionStatus = "connecting" | "open" | "reconnecting" | "closed";

/**
 * The close codes after which the client reconnects by itself: 1001 Going Away
 * (this server's drain, a proxy going down), 1005 (no code), 1006 (no close
 * frame: a crash, a lost network), 1011 Internal Error, 1012 Service Restart,
 * 1013 Try Again Later, 1014 Bad Gateway. Any other code is final: 1000, 1008
 * (a full room, a duplicate user, a rate limit), 1002/1003/1007/1009 (what was
 * sent was refused; it would be again), 4000 (replaced by a newer connection of
 * the same user), 4001-4999 and 3000-3999 (the server's or a proxy's refusals).
 */
export const RECONNECT_CODES: readonly number[] = Object.freeze([1001, 1005, 1006, 1011, 1012, 1013, 1014]);

/** Reconnecting after a close with one of [`RECONNECT_CODES`]. */
export interface ReconnectOptions {
  /** The delay before the first attempt, in ms; it doubles after each failed attempt. Default 250. */
  initialDelayMs?: number;
  /** The longest delay between two attempts, in ms. Default 3000. Every delay is jittered down to half of it. */
  maxDelayMs?: number;
  /** An attempt not open after this many ms is abandoned (a server that accepts and never answers). Default 10000. */
  attemptTimeoutMs?: number;
  /**
   * The client gives up (the connection closes for good: `onClose`, `closed`)
   * when no attempt has brought the room back this many ms after the close.
   * Default 60000.
   */
  giveUpAfterMs?: number;
  /**
   * Messages sent while reconnecting wait, in order, and go out when the room is
   * back (the new socket's first frame): at most this many (default 1000; `send`
   * returns false past it). Cursor moves do not count: only the newest waits.
   * Updates of a shape already waiting merge into its waiting update.
   */
  maxQueued?: number;
}

/**
 * A socket that brought the room back and closed again within this many ms
 * does not start a new series: the backoff goes on growing (a server or room
 * that crashes as soon as it is joined is not hammered).
 */
const STABLE_AFTER_MS = 5000;

/** The reconnect settings when an option is left out. */
export const RECONNECT_DEFAULTS: Readonly<Required<ReconnectOptions>> = Object.freeze({
  initialDelayMs: 250,
  maxDelayMs: 3000,
  attemptTimeoutMs: 10000,
  giveUpAfterMs: 60000,
  maxQueued: 1000,
});

export interface ConnectOptions {
  /**
   * "v2" (the default) offers `whiteboard.v2`. A v1 server that echoes the offer
   * (the Node.js server: npm `ws` accepts the first offered subprotocol) sends a
   * v1 snapshot first: that socket is v1. One that answers without the
   * subprotocol fails the handshake (WebSocket implementations require it): one
   * more attempt offers nothing, and the connection is v1. "v1" offers nothing.
   */
  protocol?: Protocol;
  /** The WebSocket to use; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** Called after every change of `state` (also with the first snapshot after a reconnect). */
  onChange?: (state: RoomState) => void;
  /**
   * Called once when the connection closes for good: a final close code, the
   * app's `close()`, or reconnecting given up (also when it never opened).
   */
  onClose?: (info: CloseInfo) => void;
  /** Called after every change of `status`. */
  onStatus?: (status: ConnectionStatus) => void;
  /**
   * Called with what a change listener (`onChange`, `subscribe`) threw; the
   * other listeners are still called. Default: `console.error`.
   */
  onError?: (error: unknown) => void;
  /**
   * The first connection closes (1006, `opened` rejects) when it is not open
   * this many ms after `connect`. Default 30000, as the public client; 0: none.
   */
  connectTimeoutMs?: number;
  /**
   * Reconnect by itself after an unexpected close (see `RECONNECT_CODES`).
   * Default true (with `RECONNECT_DEFAULTS`); false: every close is final.
   */
  reconnect?: boolean | ReconnectOptions;
  /**
   * Where to reconnect: the first attempt after a close reuses the URL (and its
   * token); when it fails, every further attempt first asks this for a URL (an
   * app asks its backend for the room's server and a fresh token). A throw or a
   * rejection counts as a failed attempt. Without it, every attempt reuses the URL.
   */
  resolve?: () => string | Promise<string>;
  /**
   * Messages to send first, when the first socket opens: what an earlier
   * connection left unsent (its `unsent`), e.g. after it gave up.
   */
  pending?: readonly ClientMessage[];
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
  /** Messages sent (resyncs and queued messages included). */
  sent: number;
  /** The last frame that was not applied, and why. */
  lastProblem: string | null;
  /** This client's messages a room limit refused (v2 `error` messages). */
  refused: number;
  /** Times the room came back after an unexpected close (a first frame on a new socket). */
  reconnects: number;
  /** Sockets whose handshake said v2 and whose first frame was a v1 snapshot. */
  v1ByContent: number;
  /** Messages refused while reconnecting because the queue was full. */
  queueFull: number;
}

const OPEN = 1;

/** The close codes a browser lets a page send (others throw): 1000 and 3000-4999. */
export function validCloseCode(code: number | undefined): number {
  return code === 1000 || (Number.isInteger(code) && (code as number) >= 3000 && (code as number) <= 4999)
    ? (code as number)
    : 1000;
}

/**
 * Drops a socket the client gave up on: closed, and torn down where the
 * implementation can (the `ws` package's `terminate`), so a peer that never
 * answers the close frame does not hold it (or a Node process) open.
 */
function abandon(ws: WebSocketLike): void {
  try {
    ws.close();
  } catch {
    // not open: nothing to close
  }
  (ws as { terminate?: () => void }).terminate?.();
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

/** One socket of a connection (the v2 offer, its v1 fallback, each reconnect). */
interface Attempt {
  readonly ws: WebSocketLike;
  readonly wanted: Protocol;
  open: boolean;
  openedAt: number;
  /** The handshake said v2: the first frame says whether the server really speaks it. */
  sniffing: boolean;
  /** A frame has arrived on it. */
  heard: boolean;
  /**
   * Messages go straight out on it: from its open on the first connection,
   * from its first frame (the room is back) on a reconnect.
   */
  ready: boolean;
}

/**
 * One connection to a room, reconnecting by itself after an unexpected close
 * (see `ConnectOptions.reconnect`). `state` is the room as a v1 snapshot; it
 * starts empty and changes with every message (see `subscribe`); while
 * reconnecting it stays as it was, and the new connection's first snapshot
 * replaces it.
 */
export class RoomConnection {
  /** "v2" or "v1" on the current socket once known; null before the first. */
  protocol: Protocol | null = null;
  /** Where the connection is (see `ConnectionStatus`). */
  status: ConnectionStatus = "connecting";
  /** How the connection closed for good; null until then. */
  closeInfo: CloseInfo | null = null;
  /**
   * Resolves with the handshake's protocol once the first socket is open;
   * rejects if the connection closes first. (A server that accepted the v2
   * offer but sends a v1 snapshot first is read as v1 from that frame on:
   * `protocol` says so.)
   */
  readonly opened: Promise<Protocol>;
  /** Resolves when the connection closes for good. */
  readonly closed: Promise<CloseInfo>;
  readonly stats: ClientStats = {
    frames: 0, changes: 0, resyncs: 0, sent: 0, lastProblem: null, refused: 0, reconnects: 0, v1ByContent: 0,
    queueFull: 0,
  };
  /** The URL of the current (or next) attempt: the first, or the last one `resolve` gave. */
  url: string;

  /** Attempts that offered v2 and failed before opening, then retried as v1. */
  fallbacks = 0;
  /** v1 connections made again after a `1008 Duplicate user` right after the fallback (0 or 1). */
  duplicateRetries = 0;

  private sync: SyncState = initialSync();
  private attempt: Attempt | null = null;
  private closing = false;
  /** What the app's `close()` asked for: the connection ends with it. */
  private closeRequest: CloseInfo | null = null;
  /** Ends the reconnect series when the room is not back in time (`giveUpAfterMs`). */
  private giveUpTimer: TimerId | null = null;
  /** When the room last came back, and after how many failed attempts (see `STABLE_AFTER_MS`). */
  private cameBack: { at: number; failures: number } | null = null;
  /** The last socket was v1 after its v2 offer failed the handshake (a server that does not echo the offer). */
  private lastFellBack = false;
  /** `resolve` gave a URL this series (another server, maybe of another kind). */
  private movedThisSeries = false;
  private unsentMessages: ClientMessage[] = [];
  /** A wait before the next attempt (after a duplicate, or reconnecting), and what the connection closes with if it ends during it. */
  private waiting: { timer: TimerId; info: CloseInfo } | null = null;
  /** The connect timeout of the attempt in flight. */
  private attemptTimer: TimerId | null = null;
  /** Reconnecting since (ms), the failed attempts so far, and the close that started it. */
  private lost: { since: number; failures: number; info: CloseInfo } | null = null;
  private queue: ClientMessage[] = [];
  private queuedCursor: ClientMessage | null = null;
  private readonly listeners = new Set<(state: RoomState) => void>();
  private readonly Ctor: WebSocketConstructor;
  private readonly preferred: Protocol;
  private readonly reconnectOptions: Readonly<Required<ReconnectOptions>> | null;
  private readonly options: ConnectOptions;
  private readonly onError: (error: unknown) => void;
  private readonly resyncRetryMs: number;
  private readonly fallbackRetryMs: number;
  private readonly connectTimeoutMs: number;
  private resyncTimer: TimerId | null = null;
  private settleOpened!: { resolve: (p: Protocol) => void; reject: (e: Error) => void };
  private settleClosed!: (info: CloseInfo) => void;

  constructor(url: string, options: ConnectOptions = {}) {
    const Ctor = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
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
    if (options.onChange) this.listeners.add(options.onChange);
    this.onError = options.onError ?? reportError;
    this.resyncRetryMs = options.resyncRetryMs ?? 2000;
    this.fallbackRetryMs = options.fallbackRetryMs ?? 1000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 30000;
    this.opened = new Promise((resolve, reject) => (this.settleOpened = { resolve, reject }));
    this.opened.catch(() => {}); // a caller that never awaits it must not see an unhandled rejection
    this.closed = new Promise((resolve) => (this.settleClosed = resolve));
    this.queue = [...(options.pending ?? [])];

    this.dial(this.preferred);
    this.startAttemptTimer(this.connectTimeoutMs);
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

  /** Whether a socket is open now and the room on it (messages go out at once). */
  get isOpen(): boolean {
    return this.attempt?.ws.readyState === OPEN && this.attempt.ready;
  }

  /** What was waiting to be sent when the connection ended for good (it was not sent). */
  get unsent(): readonly ClientMessage[] {
    return this.unsentMessages;
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
    const attempt = this.attempt;
    if (!attempt || !this.isOpen) return false;
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
  send(message: ClientMessage): boolean {
    const attempt = this.attempt;
    if (attempt && this.isOpen) {
      this.write(attempt, message);
      return true;
    }
    if (this.closeInfo || this.closing) return false;
    // Waiting for the room: reconnecting; a socket open whose first frame is
    // not here (messages from an earlier connection wait ahead); or a socket
    // closing (its close event not yet here), which will reconnect or keep
    // what waits in `unsent`.
    const waiting =
      this.status === "reconnecting" ||
      (attempt !== null && attempt.open) ||
      (this.status === "open" && this.reconnectOptions !== null);
    return waiting && this.enqueue(message);
  }

  /**
   * Closes the connection for good. A code a browser would refuse (anything but
   * 1000 and 3000-4999: it throws and the socket stays open) becomes 1000.
   */
  close(code?: number, reason?: string): void {
    if (this.closeInfo || this.closing) return;
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
      } catch {
        // A reason a browser refuses (over 123 bytes of UTF-8): close without it.
        try {
          attempt.ws.close(valid);
        } catch {
          // already closed
        }
      }
    }
    this.finish(this.closeRequest);
  }

  // --- sockets -------------------------------------------------------------

  private dial(wanted: Protocol): void {
    const ws = wanted === "v2" ? new this.Ctor(this.url, [SUBPROTOCOL_V2]) : new this.Ctor(this.url);
    const attempt: Attempt = { ws, wanted, open: false, openedAt: 0, sniffing: false, heard: false, ready: false };
    this.attempt = attempt;
    // Handlers as properties: every WebSocket implementation has them.
    const handlers = ws as unknown as {
      onopen: (() => void) | null;
      onmessage: ((event: { data: unknown }) => void) | null;
      onclose: ((event: { code: number; reason: string; wasClean: boolean }) => void) | null;
      onerror: (() => void) | null;
    };
    handlers.onopen = () => {
      if (this.attempt === attempt) this.opening(attempt);
    };
    handlers.onmessage = (event) => {
      if (this.attempt === attempt && attempt.open) this.receive(attempt, event.data);
    };
    // Before it opens, an error is a failed handshake (Node 20's WebSocket sends
    // no close event after it); after, a close event follows.
    handlers.onerror = () => {
      if (this.attempt === attempt && !attempt.open) this.ended(attempt, { code: 1006, reason: "", wasClean: false });
    };
    handlers.onclose = (event) => {
      if (this.attempt === attempt) {
        this.ended(attempt, { code: event.code, reason: event.reason, wasClean: event.wasClean });
      }
    };
  }

  /** Forgets a socket: its events are ignored from now on. */
  private detach(attempt: Attempt): void {
    const handlers = attempt.ws as unknown as Record<"onopen" | "onmessage" | "onclose" | "onerror", null>;
    handlers.onopen = handlers.onmessage = handlers.onclose = handlers.onerror = null;
    if (this.attempt === attempt) this.attempt = null;
  }

  private opening(attempt: Attempt): void {
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
    if (this.lost) return;
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
  private ready(attempt: Attempt): void {
    attempt.ready = true;
    this.flush(attempt);
    this.setStatus("open");
  }

  private ended(attempt: Attempt, info: CloseInfo): void {
    this.detach(attempt);
    this.stopResyncRetry();
    // Reconnecting, each attempt has its own timeout; a first connection's
    // covers its fallback too (`connect(token, timeoutMs)` is one deadline).
    if (this.lost) this.stopAttemptTimer();
    if (this.duplicateOfFallback(attempt, info)) {
      this.duplicateRetries++;
      this.setStatus(this.lost ? "reconnecting" : "connecting");
      if (this.over) return; // the app closed from its onStatus
      this.wait(this.fallbackRetryMs, info, () => {
        this.dial("v1");
        this.startAttemptTimer(this.lost ? this.reconnectOptions!.attemptTimeoutMs : this.connectTimeoutMs);
      });
    } else if (this.closing) {
      this.finish(this.closeRequest ?? info);
    } else if (!attempt.open && attempt.wanted === "v2" && this.mayFallBack()) {
      // Browsers (and Node's WebSocket, and the `ws` package) FAIL a handshake
      // whose answer lacks an offered subprotocol, which is what a v1 server
      // that does not echo the offer sends: try once more without the offer.
      this.fallbacks++;
      try {
        attempt.ws.close();
      } catch {
        // already closed
      }
      this.dial("v1");
      if (this.lost) this.startAttemptTimer(this.reconnectOptions!.attemptTimeoutMs);
    } else if (!attempt.open) {
      this.attemptFailed(info);
    } else if (this.reconnectOptions && RECONNECT_CODES.includes(info.code)) {
      this.reconnect(info);
    } else {
      this.finish(info);
    }
  }

  // A v2 attempt that fails before it opens is retried at once without the
  // offer on a first connection, or when the room's server may be of another
  // kind: the last socket fell back, or `resolve` moved the room. Otherwise,
  // reconnecting to the server that spoke v2 or echoed the offer, a failure is
  // the server still being down: one socket per attempt, not two.
  private mayFallBack(): boolean {
    return !this.lost || this.lastFellBack || this.movedThisSeries;
  }

  // After a fallback, the server may still hold the failed v2 attempt (an
  // older server behind a slow proxy sees its close late) and turn the v1
  // connection away as a duplicate of it: one more v1 attempt, a little later.
  private duplicateOfFallback(attempt: Attempt, info: CloseInfo): boolean {
    return (
      attempt.wanted === "v1" &&
      this.fallbacks > 0 &&
      this.duplicateRetries === 0 &&
      !this.closing &&
      info.code === 1008 &&
      info.reason === "Duplicate user" &&
      (!attempt.open || Date.now() - attempt.openedAt < DUPLICATE_AFTER_FALLBACK_MS)
    );
  }

  // --- reconnecting --------------------------------------------------------

  /** An open socket closed with a code that says "come back". */
  private reconnect(info: CloseInfo): void {
    // Lost again before the room came back: the same series (its backoff goes on).
    if (!this.lost) {
      const now = Date.now();
      const flapping = this.cameBack !== null && now - this.cameBack.at < STABLE_AFTER_MS;
      this.lost = { since: now, failures: flapping ? this.cameBack!.failures : 0, info };
      this.movedThisSeries = false;
      this.duplicateRetries = 0;
      this.giveUpTimer = timers.setTimeout(() => {
        this.giveUpTimer = null;
        this.giveUp();
      }, this.reconnectOptions!.giveUpAfterMs);
    }
    this.setStatus("reconnecting");
    if (this.over) return; // the app closed from its onStatus
    this.scheduleAttempt();
  }

  /** The connection has ended, or the app has closed it. */
  private get over(): boolean {
    return this.closeInfo !== null || this.closing;
  }

  /** The room is back on `attempt` (its first frame): the series ends. */
  private cameBackOn(attempt: Attempt): void {
    const lost = this.lost!;
    this.stopAttemptTimer();
    this.stopGiveUpTimer();
    this.cameBack = { at: Date.now(), failures: lost.failures };
    this.lost = null;
    this.duplicateRetries = 0;
    this.stats.reconnects++;
    this.ready(attempt);
  }

  /** No attempt brought the room back in time: the connection ends with the close that started the series. */
  private giveUp(): void {
    const lost = this.lost;
    if (!lost || this.closeInfo) return;
    const attempt = this.attempt;
    if (attempt) {
      this.detach(attempt);
      abandon(attempt.ws);
    }
    this.finish(lost.info);
  }

  private stopGiveUpTimer(): void {
    if (this.giveUpTimer !== null) timers.clearTimeout(this.giveUpTimer);
    this.giveUpTimer = null;
  }

  /** An attempt failed before it opened (or timed out). */
  private attemptFailed(info: CloseInfo): void {
    this.stopAttemptTimer();
    if (this.over) return;
    if (this.lost) this.scheduleAttempt();
    else this.finish(info); // the first connection never opened: `opened` rejects
  }

  private scheduleAttempt(): void {
    const lost = this.lost!;
    const settings = this.reconnectOptions!;
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

  private async redial(): Promise<void> {
    const lost = this.lost!;
    // The first attempt reuses the URL; once it failed, ask for a new one.
    if (lost.failures > 1 && this.options.resolve) {
      let url: string;
      try {
        url = await this.options.resolve();
      } catch {
        if (!this.closing && !this.closeInfo) this.scheduleAttempt();
        return;
      }
      if (this.closing || this.closeInfo || this.lost !== lost) return;
      if (typeof url !== "string" || url === "") {
        this.scheduleAttempt(); // nothing usable: a failed attempt
        return;
      }
      if (url !== this.url) this.movedThisSeries = true;
      this.url = url;
    }
    try {
      this.dial(this.preferred);
    } catch {
      this.scheduleAttempt(); // a URL the WebSocket refuses
      return;
    }
    this.startAttemptTimer(this.reconnectOptions!.attemptTimeoutMs);
  }

  private wait(ms: number, info: CloseInfo, then: () => void): void {
    const timer = timers.setTimeout(() => {
      this.waiting = null;
      then();
    }, ms);
    this.waiting = { timer, info };
  }

  private startAttemptTimer(ms: number): void {
    this.stopAttemptTimer();
    if (!(ms > 0)) return;
    this.attemptTimer = timers.setTimeout(() => {
      this.attemptTimer = null;
      const attempt = this.attempt;
      if (!attempt || attempt.ready) return;
      this.detach(attempt);
      abandon(attempt.ws);
      this.attemptFailed({ code: 1006, reason: `connect timeout after ${ms} ms`, wasClean: false });
    }, ms);
  }

  private stopAttemptTimer(): void {
    if (this.attemptTimer !== null) timers.clearTimeout(this.attemptTimer);
    this.attemptTimer = null;
  }

  /** The connection ends for good. */
  private finish(info: CloseInfo): void {
    if (this.closeInfo) return;
    if (this.attempt) this.detach(this.attempt);
    if (this.waiting) timers.clearTimeout(this.waiting.timer);
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
    } catch (error) {
      this.report(error);
    }
  }

  /** Hands what an app callback threw to `onError` (which must not throw either). */
  private report(error: unknown): void {
    try {
      this.onError(error);
    } catch {
      // an onError that throws: nothing more to do
    }
  }

  private setStatus(status: ConnectionStatus): void {
    if (this.status === status) return;
    this.status = status;
    try {
      this.options.onStatus?.(status);
    } catch (error) {
      this.report(error);
    }
  }

  // --- messages ------------------------------------------------------------

  private write(attempt: Attempt, message: ClientMessage): void {
    attempt.ws.send(JSON.stringify(message));
    this.stats.sent++;
  }

  private enqueue(message: ClientMessage): boolean {
    if (message.type === "resync") return false;
    if (message.type === "cursor_move") {
      this.queuedCursor = message;
      return true;
    }
    if (message.type === "shape_update") {
      // Updates of different shapes commute: one waiting update per shape (a
      // drag of two shapes at once stays two messages), up to a delete of it.
      for (let i = this.queue.length - 1; i >= 0; i--) {
        const waiting = this.queue[i];
        if (waiting.type === "shape_delete" && waiting.shapeId === message.shapeId) break;
        if (waiting.type === "shape_update" && waiting.shapeId === message.shapeId) {
          const merged: Record<string, unknown> = { ...waiting };
          for (const [key, value] of Object.entries(message)) if (value !== undefined) merged[key] = value;
          this.queue[i] = merged as ClientMessage;
          return true;
        }
      }
    }
    if (this.queue.length >= this.reconnectOptions!.maxQueued) {
      this.stats.queueFull++;
      return false;
    }
    this.queue.push(message);
    return true;
  }

  /** What waited while reconnecting goes out on the new socket: shape ops in order, then the newest cursor. */
  private flush(attempt: Attempt): void {
    const queued = this.queue;
    const cursor = this.queuedCursor;
    this.queue = [];
    this.queuedCursor = null;
    for (const message of queued) this.write(attempt, message);
    if (cursor) this.write(attempt, cursor);
  }

  private receive(attempt: Attempt, data: unknown): void {
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
      if (this.lost) this.cameBackOn(attempt);
      else if (!attempt.ready) this.ready(attempt);
      if (this.attempt !== attempt) return; // the app closed from its onStatus
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
          this.report(error);
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
export function connect(url: string, options: ConnectOptions = {}): RoomConnection {
  return new RoomConnection(url, options);
}

// ---------------------------------------------------------------------------
// The drop-in for the public React client's session class.

/** Options of the drop-in `SessionClient` (all optional: `SessionClient.create(host)` needs none). */
export interface SessionClientOptions {
  /**
   * `wss` (true) or `ws` (false). Default: `wss` on an `https:` page, `ws` on
   * any other page and where there is no page (Node).
   */
  secure?: boolean;
  /** "v2" (default: offered, v1 when the server does not speak it) or "v1". */
  protocol?: Protocol;
  /** The WebSocket to use; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** Reconnecting (see `ReconnectOptions`); default on, false: every close is final. */
  reconnect?: boolean | ReconnectOptions;
  /**
   * The room's server and a fresh token for a reconnect attempt, from the
   * app's backend (the lookup its Reconnect button does), asked for once
   * reconnecting to the same host failed (e.g. after an Agones drain). `host`
   * then changes to the one returned.
   */
  resolve?: () => { host: string; token: string } | Promise<{ host: string; token: string }>;
  /** Called after every change of `status`. */
  onStatus?: (status: ConnectionStatus) => void;
}

/**
 * A v1 snapshot as the public client types it (its `BoardSessionData`): what
 * `onMessage` hands out. The arrays and their objects are shared with the
 * client's next snapshots: read them, do not modify them in place.
 */
export interface BoardSessionData {
  connectedUsers: string[];
  cursors: Cursor[];
  shapes: Shape[];
}

/** The public client's name for a cursor. */
export type CursorPosition = Cursor;

/**
 * What connections that ended for good left unsent, by room and user: the
 * app's Reconnect makes a new `SessionClient` for the same room, whose
 * connection sends them first. In this page's memory only, and for
 * `LEFTOVERS_KEPT_MS`: older edits would overwrite what others did since.
 */
const leftovers = new Map<string, { at: number; messages: readonly ClientMessage[] }>();
const LEFTOVERS_KEPT_MS = 5 * 60_000;

/** The room and user a token names (read, not verified: the server does that), or null. */
function sessionKey(token: string): string | null {
  try {
    const decode = (globalThis as { atob?: (data: string) => string }).atob;
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(decode!(payload)) as { roomId?: unknown; userId?: unknown };
    return typeof claims.roomId === "string" && typeof claims.userId === "string"
      ? `${claims.roomId}\n${claims.userId}`
      : null;
  } catch {
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
  /** `address:port`, as the backend's scheduler gave it (changes when `resolve` gives another). */
  host: string;
  private connection: RoomConnection | null = null;
  private messageCallback: ((snapshot: BoardSessionData) => void) | null = null;
  private closeCallback: (() => void) | null = null;
  private statusCallback: ((status: ConnectionStatus) => void) | null = null;
  private readonly options: SessionClientOptions;

  constructor(host: string, options: SessionClientOptions = {}) {
    this.host = host;
    this.options = options;
    this.statusCallback = options.onStatus ?? null;
  }

  static create(host: string, options: SessionClientOptions = {}): SessionClient {
    return new SessionClient(host, options);
  }

  /** Where the connection is; "closed" before `connect`. */
  get status(): ConnectionStatus {
    return this.connection?.status ?? "closed";
  }

  /** The protocol of the current socket ("v2" or "v1"), null before the first. */
  get protocol(): Protocol | null {
    return this.connection?.protocol ?? null;
  }

  /** The connection underneath (null before `connect`): its `state`, `stats`, `subscribe`. */
  get room(): RoomConnection | null {
    return this.connection;
  }

  /**
   * Opens `ws(s)://host/?token=…`. Resolves when the socket opens; rejects when
   * it fails first, or is still not open after `timeoutMs` (then nothing is
   * left open). A connection that never opened does not call `onClose`.
   */
  connect(token: string, timeoutMs = 30000): Promise<void> {
    const previous = this.connection;
    this.connection = null;
    previous?.close(); // a second connect replaces the first, without its onClose
    const secure =
      this.options.secure ?? (globalThis as { location?: { protocol?: string } }).location?.protocol === "https:";
    const url = (host: string, token: string) => `${secure ? "wss" : "ws"}://${host}/?token=${token}`;
    const resolveUrl = this.options.resolve;
    const key = sessionKey(token);
    const left = key === null ? undefined : leftovers.get(key);
    const pending = left && Date.now() - left.at < LEFTOVERS_KEPT_MS ? left.messages : undefined;
    if (key !== null) leftovers.delete(key);
    let opened = false;
    return new Promise<void>((resolve, reject) => {
      const connection: RoomConnection = new RoomConnection(url(this.host, token), {
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
          if (this.connection === connection) this.messageCallback?.(state as BoardSessionData);
        },
        onStatus: (status) => {
          if (status === "open" && !opened) {
            opened = true;
            resolve();
          }
          if (this.connection === connection) this.statusCallback?.(status);
        },
        onClose: (info) => {
          if (key !== null && connection.unsent.length > 0) {
            leftovers.set(key, { at: Date.now(), messages: connection.unsent });
          }
          if (!opened) {
            reject(
              new Error(
                info.reason.startsWith("connect timeout")
                  ? `WebSocket connection timeout after ${timeoutMs}ms`
                  : `WebSocket connection failed (${info.code}${info.reason ? ` ${info.reason}` : ""})`,
              ),
            );
          } else if (this.connection === connection) {
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
  onMessage<S = BoardSessionData>(callback: (snapshot: S) => void): void {
    this.messageCallback = callback as unknown as (snapshot: BoardSessionData) => void;
  }

  /** `callback` is called once when the connection ends for good (not while it reconnects). */
  onClose(callback: () => void): void {
    this.closeCallback = callback;
  }

  /** `callback` is called at every change of `status` (not in the public client: for a "reconnecting" banner). */
  onStatus(callback: (status: ConnectionStatus) => void): void {
    this.statusCallback = callback;
  }

  sendCursorMove(x: number, y: number): boolean {
    return this.send({ type: "cursor_move", x, y });
  }

  sendShapeCreate(
    shapeType: ShapeType,
    x: number,
    y: number,
    width: number,
    height: number,
    options: { text?: string; fill?: string; stroke?: string } = {},
  ): boolean {
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

  sendShapeUpdate(shapeId: string, updates: ShapeChanges): boolean {
    return this.send({ type: "shape_update", shapeId, ...updates });
  }

  sendShapeDelete(shapeId: string): boolean {
    return this.send({ type: "shape_delete", shapeId });
  }

  /** Closes the connection for good (`onClose` is called if it had opened). */
  close(): void {
    this.connection?.close();
  }

  /** Sent at once when open, queued while reconnecting; otherwise a warning and false, as the public client. */
  private send(message: ClientMessage): boolean {
    if (this.connection?.send(message)) return true;
    (globalThis as { console?: { warn(...data: unknown[]): void } }).console?.warn(
      this.connection?.status === "reconnecting"
        ? "Cannot send message: too many messages wait for the reconnection"
        : "Cannot send message: socket not connected",
    );
    return false;
  }
}
