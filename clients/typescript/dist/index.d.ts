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
export declare const SUBPROTOCOL_V2 = "whiteboard.v2";
export type Op = {
    op: "join";
    userId: string;
} | {
    op: "leave";
    userId: string;
} | {
    op: "cursor";
    userId: string;
    x: number;
    y: number;
    timestamp: string;
} | {
    op: "add";
    shape: Shape;
} | {
    op: "update";
    id: string;
    set: Partial<Omit<Shape, "id">>;
} | {
    op: "remove";
    id: string;
};
export interface SnapshotMessage extends RoomState {
    type: "snapshot";
    seq: number;
}
export interface OpsMessage {
    type: "ops";
    seq: number;
    ops: Op[];
}
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
export type ClientMessage = {
    type: "cursor_move";
    x: number;
    y: number;
} | ({
    type: "shape_create";
} & NewShape) | ({
    type: "shape_update";
    shapeId: string;
} & ShapeChanges) | {
    type: "shape_delete";
    shapeId: string;
} | {
    type: "resync";
};
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
export declare const EMPTY_ROOM: RoomState;
/**
 * The sync state of a connection before its first message: a new empty room
 * every time, so that no two clients share (and a careless `push` on one
 * cannot change) a starting state.
 */
export declare function initialSync(): SyncState;
/**
 * Applies one batch of v2 ops to a room, in order. Returns the new room, or
 * the reason the batch cannot be applied (an op naming a user or shape the
 * room does not have, or one that would make it differ from any v1 snapshot:
 * a second join of a connected user, a second shape with one id). The input
 * is not modified.
 */
export declare function applyOps(room: RoomState, ops: readonly unknown[]): RoomState | {
    error: string;
};
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
export declare function applyFrame(sync: SyncState, data: string, protocol: Protocol): ApplyResult;
/**
 * Whether a frame is a v1 snapshot (an object with the three arrays and no
 * `type`). A server that echoes every offered subprotocol but speaks v1 (the
 * Node.js server's `ws` does) is found by its first frame being one.
 */
export declare function isV1Snapshot(data: string): boolean;
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
export declare const RECONNECT_CODES: readonly number[];
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
/** The reconnect settings when an option is left out. */
export declare const RECONNECT_DEFAULTS: Readonly<Required<ReconnectOptions>>;
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
/** The close codes a browser lets a page send (others throw): 1000 and 3000-4999. */
export declare function validCloseCode(code: number | undefined): number;
/**
 * One connection to a room, reconnecting by itself after an unexpected close
 * (see `ConnectOptions.reconnect`). `state` is the room as a v1 snapshot; it
 * starts empty and changes with every message (see `subscribe`); while
 * reconnecting it stays as it was, and the new connection's first snapshot
 * replaces it.
 */
export declare class RoomConnection {
    /** "v2" or "v1" on the current socket once known; null before the first. */
    protocol: Protocol | null;
    /** Where the connection is (see `ConnectionStatus`). */
    status: ConnectionStatus;
    /** How the connection closed for good; null until then. */
    closeInfo: CloseInfo | null;
    /**
     * Resolves with the handshake's protocol once the first socket is open;
     * rejects if the connection closes first. (A server that accepted the v2
     * offer but sends a v1 snapshot first is read as v1 from that frame on:
     * `protocol` says so.)
     */
    readonly opened: Promise<Protocol>;
    /** Resolves when the connection closes for good. */
    readonly closed: Promise<CloseInfo>;
    readonly stats: ClientStats;
    /** The URL of the current (or next) attempt: the first, or the last one `resolve` gave. */
    url: string;
    /** Attempts that offered v2 and failed before opening, then retried as v1. */
    fallbacks: number;
    /** v1 connections made again after a `1008 Duplicate user` right after the fallback (0 or 1). */
    duplicateRetries: number;
    private sync;
    private attempt;
    private closing;
    /** What the app's `close()` asked for: the connection ends with it. */
    private closeRequest;
    /** Ends the reconnect series when the room is not back in time (`giveUpAfterMs`). */
    private giveUpTimer;
    /** When the room last came back, and after how many failed attempts (see `STABLE_AFTER_MS`). */
    private cameBack;
    /** The last socket was v1 after its v2 offer failed the handshake (a server that does not echo the offer). */
    private lastFellBack;
    /** `resolve` gave a URL this series (another server, maybe of another kind). */
    private movedThisSeries;
    private unsentMessages;
    /** A wait before the next attempt (after a duplicate, or reconnecting), and what the connection closes with if it ends during it. */
    private waiting;
    /** The connect timeout of the attempt in flight. */
    private attemptTimer;
    /** Reconnecting since (ms), the failed attempts so far, and the close that started it. */
    private lost;
    private queue;
    private queuedCursor;
    private readonly listeners;
    private readonly Ctor;
    private readonly preferred;
    private readonly reconnectOptions;
    private readonly options;
    private readonly onError;
    private readonly resyncRetryMs;
    private readonly fallbackRetryMs;
    private readonly connectTimeoutMs;
    private resyncTimer;
    private settleOpened;
    private settleClosed;
    constructor(url: string, options?: ConnectOptions);
    /** The room as a v1 snapshot (do not mutate it). */
    get state(): RoomState;
    /** The `seq` of the last v2 message applied (null in v1 and before the first snapshot). */
    get lastSeq(): number | null;
    /** Same as `state`, for `useSyncExternalStore(client.subscribe, client.getState)`. */
    getState: () => RoomState;
    /** Calls `listener` after every change of `state`; returns the unsubscribe function. */
    subscribe: (listener: (state: RoomState) => void) => (() => void);
    /** Whether a socket is open now and the room on it (messages go out at once). */
    get isOpen(): boolean;
    /** What was waiting to be sent when the connection ended for good (it was not sent). */
    get unsent(): readonly ClientMessage[];
    moveCursor(x: number, y: number): boolean;
    createShape(shape: NewShape): boolean;
    updateShape(shapeId: string, changes: ShapeChanges): boolean;
    deleteShape(shapeId: string): boolean;
    /** Asks a v2 server for a fresh snapshot (a v1 server ignores it). */
    resync(): boolean;
    /**
     * Sends any client message. Open: it goes out at once. Reconnecting: it waits
     * for the new connection (see `ReconnectOptions.maxQueued`; a resync does not
     * wait). Otherwise (connecting the first time, closed) nothing is sent. True
     * when sent or waiting, false when not.
     */
    send(message: ClientMessage): boolean;
    /**
     * Closes the connection for good. A code a browser would refuse (anything but
     * 1000 and 3000-4999: it throws and the socket stays open) becomes 1000.
     */
    close(code?: number, reason?: string): void;
    private dial;
    /** Forgets a socket: its events are ignored from now on. */
    private detach;
    private opening;
    /** Messages go straight out on `attempt` from now on; what waited goes first. */
    private ready;
    private ended;
    private mayFallBack;
    private duplicateOfFallback;
    /** An open socket closed with a code that says "come back". */
    private reconnect;
    /** The connection has ended, or the app has closed it. */
    private get over();
    /** The room is back on `attempt` (its first frame): the series ends. */
    private cameBackOn;
    /** No attempt brought the room back in time: the connection ends with the close that started the series. */
    private giveUp;
    private stopGiveUpTimer;
    /** An attempt failed before it opened (or timed out). */
    private attemptFailed;
    private scheduleAttempt;
    private redial;
    private wait;
    private startAttemptTimer;
    private stopAttemptTimer;
    /** The connection ends for good. */
    private finish;
    /** Hands what an app callback threw to `onError` (which must not throw either). */
    private report;
    private setStatus;
    private write;
    private enqueue;
    /** What waited while reconnecting goes out on the new socket: shape ops in order, then the newest cursor. */
    private flush;
    private receive;
    private startResyncRetry;
    private stopResyncRetry;
}
/** Opens a connection: `url` is the server's WebSocket URL with the token (`wss://host/?token=…`). */
export declare function connect(url: string, options?: ConnectOptions): RoomConnection;
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
    resolve?: () => {
        host: string;
        token: string;
    } | Promise<{
        host: string;
        token: string;
    }>;
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
 * The public React client's session class (`client/src/sessionClient.ts`), with
 * the same surface, over `RoomConnection`: switching is one changed import (or
 * this file copied over that one). What differs is what a user sees: it speaks
 * v2 where the server does, and it comes back by itself after a server restart
 * or a lost network (see `RECONNECT_CODES`), calling `onClose` only when the
 * connection ends for good.
 */
export declare class SessionClient {
    /** `address:port`, as the backend's scheduler gave it (changes when `resolve` gives another). */
    host: string;
    private connection;
    private messageCallback;
    private closeCallback;
    private statusCallback;
    private readonly options;
    constructor(host: string, options?: SessionClientOptions);
    static create(host: string, options?: SessionClientOptions): SessionClient;
    /** Where the connection is; "closed" before `connect`. */
    get status(): ConnectionStatus;
    /** The protocol of the current socket ("v2" or "v1"), null before the first. */
    get protocol(): Protocol | null;
    /** The connection underneath (null before `connect`): its `state`, `stats`, `subscribe`. */
    get room(): RoomConnection | null;
    /**
     * Opens `ws(s)://host/?token=…`. Resolves when the socket opens; rejects when
     * it fails first, or is still not open after `timeoutMs` (then nothing is
     * left open). A connection that never opened does not call `onClose`.
     */
    connect(token: string, timeoutMs?: number): Promise<void>;
    /**
     * `callback` gets the room as a v1 snapshot at every change (the first
     * snapshot, and after a reconnect the new first one). Type it as your app
     * types its snapshots: timestamps are ISO strings, as the server sends them.
     */
    onMessage<S = BoardSessionData>(callback: (snapshot: S) => void): void;
    /** `callback` is called once when the connection ends for good (not while it reconnects). */
    onClose(callback: () => void): void;
    /** `callback` is called at every change of `status` (not in the public client: for a "reconnecting" banner). */
    onStatus(callback: (status: ConnectionStatus) => void): void;
    sendCursorMove(x: number, y: number): boolean;
    sendShapeCreate(shapeType: ShapeType, x: number, y: number, width: number, height: number, options?: {
        text?: string;
        fill?: string;
        stroke?: string;
    }): boolean;
    sendShapeUpdate(shapeId: string, updates: ShapeChanges): boolean;
    sendShapeDelete(shapeId: string): boolean;
    /** Closes the connection for good (`onClose` is called if it had opened). */
    close(): void;
    /** Sent at once when open, queued while reconnecting; otherwise a warning and false, as the public client. */
    private send;
}
