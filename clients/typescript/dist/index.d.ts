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
/** The close codes a browser lets a page send (others throw): 1000 and 3000-4999. */
export declare function validCloseCode(code: number | undefined): number;
/**
 * One connection to a room. `state` is the room as a v1 snapshot; it starts
 * empty and changes with every message (see `subscribe`). No reconnection: a
 * closed client stays closed (make a new one), as the public React client does.
 */
export declare class SessionClient {
    /** "v2" or "v1" once open; null before. */
    protocol: Protocol | null;
    /** How the connection closed; null while it is open or opening. */
    closeInfo: CloseInfo | null;
    /** Resolves with the protocol when the connection opens; rejects if it closes first. */
    readonly opened: Promise<Protocol>;
    /** Resolves when the connection closes. */
    readonly closed: Promise<CloseInfo>;
    readonly stats: ClientStats;
    /** Attempts that offered v2 and failed before opening, then retried as v1 (0 or 1). */
    fallbacks: number;
    /** v1 connections made again after a `1008 Duplicate user` right after the fallback (0 or 1). */
    duplicateRetries: number;
    private sync;
    private ws;
    private closing;
    /** A retry after a duplicate waiting for its timer: close() ends it at once. */
    private pendingRetry;
    private readonly listeners;
    private readonly onError;
    private readonly resyncRetryMs;
    private resyncTimer;
    constructor(url: string, options?: ConnectOptions);
    /** The room as a v1 snapshot (do not mutate it). */
    get state(): RoomState;
    /** The `seq` of the last v2 message applied (null in v1 and before the first snapshot). */
    get lastSeq(): number | null;
    /** Same as `state`, for `useSyncExternalStore(client.subscribe, client.getState)`. */
    getState: () => RoomState;
    /** Calls `listener` after every change of `state`; returns the unsubscribe function. */
    subscribe: (listener: (state: RoomState) => void) => (() => void);
    /** Whether the connection is open (the send helpers return false when it is not). */
    get isOpen(): boolean;
    moveCursor(x: number, y: number): boolean;
    createShape(shape: NewShape): boolean;
    updateShape(shapeId: string, changes: ShapeChanges): boolean;
    deleteShape(shapeId: string): boolean;
    /** Asks a v2 server for a fresh snapshot (a v1 server ignores it). */
    resync(): boolean;
    /** Sends any client message; false (and nothing sent) when the connection is not open. */
    send(message: ClientMessage): boolean;
    /**
     * Closes the connection. A code a browser would refuse (anything but 1000 and
     * 3000-4999: it throws and the socket stays open) becomes 1000.
     */
    close(code?: number, reason?: string): void;
    private receive;
    private startResyncRetry;
    private stopResyncRetry;
}
/** Opens a connection: `url` is the server's WebSocket URL with the token (`wss://host/?token=…`). */
export declare function connect(url: string, options?: ConnectOptions): SessionClient;
