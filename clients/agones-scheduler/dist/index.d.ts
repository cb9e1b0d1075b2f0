/** What the collab-board backend asks of a scheduler (backend-server/src/scheduler.ts). */
export interface Scheduler {
    createRoom(roomId: string): Promise<void>;
    getRoomHost(roomId: string): Promise<string | null>;
}
/** The part of a fetch `Response` this package reads. */
export interface RequestResponse {
    status: number;
    headers: {
        get(name: string): string | null;
    };
    text(): Promise<string>;
}
/** A fetch-like request function (the global `fetch` fits, for a plain-HTTP or pre-configured endpoint). */
export type RequestFn = (url: string, init: {
    method: "POST";
    headers: Record<string, string>;
    body: string;
    signal: AbortSignal;
}) => Promise<RequestResponse>;
/**
 * Runs `fn` while holding a lock on `roomId` shared by every backend replica
 * (e.g. a Postgres advisory lock): see README "The race".
 */
export type LockFn = <T>(roomId: string, fn: () => Promise<T>) => Promise<T>;
export type Transport = "allocator" | "kubernetes";
export interface RetryOptions {
    /** Attempts in all, the first included. Default 5. */
    maxAttempts?: number;
    /** Budget for all attempts and waits of one allocation, in ms. Default 10000. */
    totalTimeoutMs?: number;
    /** First backoff step, in ms (doubles each retry, jittered). Default 100. */
    baseDelayMs?: number;
    /** Cap of one wait, in ms (Retry-After included). Default 2000. */
    maxDelayMs?: number;
    /** Timeout of one request, in ms (cut to what is left of the budget). Default 5000. */
    requestTimeoutMs?: number;
    /**
     * How many more times to ask after an answer of "no available GameServer"
     * before returning null (Agones also answers so when its own retries of a
     * conflicting update run out). Default 1.
     */
    noServerRetries?: number;
}
/** A successful allocation, as the allocator service answers it (the Kubernetes API's `status` is mapped to it). */
export interface Allocation {
    gameServerName: string;
    address: string;
    ports: {
        name: string;
        port: number;
    }[];
    nodeName?: string;
    /** The room list after the allocation, when the answer carries it (values and capacity). */
    list?: {
        values: string[];
        capacity: number | null;
    };
}
export interface AgonesSchedulerOptions {
    /** `allocator` (default; env AGONES_TRANSPORT): the agones-allocator service over mutual TLS. `kubernetes`: the Kubernetes API with a bearer token. */
    transport?: Transport;
    /**
     * allocator: its base URL, e.g. `https://203.0.113.7` or `https://agones-allocator.agones-system.svc:443`
     * (env AGONES_ALLOCATOR_URL; `/gameserverallocation` is appended unless present).
     * kubernetes: the API server (env AGONES_KUBERNETES_URL, else https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT).
     */
    url?: string;
    /** Namespace of the GameServers (env AGONES_NAMESPACE, default `default`). */
    namespace?: string;
    /** Fleet name, matched by the `agones.dev/fleet` label (env AGONES_FLEET, default `session-server`). */
    fleet?: string;
    /** Name of the Agones List holding the room ids (env AGONES_LIST, default `rooms`). */
    listName?: string;
    /** PEM client certificate, or a path to it (env AGONES_ALLOCATOR_CLIENT_CERT: a path). allocator transport. */
    clientCert?: string | Buffer;
    /** PEM client key, or a path to it (env AGONES_ALLOCATOR_CLIENT_KEY: a path). allocator transport. */
    clientKey?: string | Buffer;
    /**
     * PEM CA that signed the server's certificate, or a path to it (allocator: env AGONES_ALLOCATOR_CA,
     * the `allocator-tls-ca` secret; kubernetes: default the service account's ca.crt).
     */
    ca?: string | Buffer;
    /**
     * The name (DNS name or IP) the server's certificate is checked against, when it differs from the
     * URL's host (env AGONES_ALLOCATOR_SERVER_NAME). Agones' Helm chart issues the allocator's
     * certificate for the load balancer IP only, so an in-cluster URL needs this set to that IP.
     */
    serverName?: string;
    /** kubernetes transport: a bearer token; default: read from `tokenFile` on every call (projected tokens rotate). */
    token?: string;
    /** kubernetes transport: default /var/run/secrets/kubernetes.io/serviceaccount/token. */
    tokenFile?: string;
    /** Replaces the built-in HTTPS client (tests, or a custom agent). Certificates are then the function's business. */
    request?: RequestFn;
    /** Cross-replica per-room lock around each allocation (see README "The race"). Default: none (in-process only). */
    lock?: LockFn;
    retry?: RetryOptions;
    /** Turns an allocation into the `host` claim. Default `address:port` (`[address]:port` for IPv6). */
    formatHost?: (allocation: Allocation) => string;
    /** Environment read for the defaults above. Default `process.env`. */
    env?: Record<string, string | undefined>;
}
/** An allocation that failed for another reason than "no server can take the room". */
export declare class AgonesSchedulerError extends Error {
    /** HTTP status of the last answer, if any. */
    readonly status: number | undefined;
    /** Attempts made. */
    readonly attempts: number;
    constructor(message: string, opts: {
        status?: number;
        attempts: number;
        cause?: unknown;
    });
}
interface SelectorParams {
    namespace: string;
    fleet: string;
    listName: string;
}
/**
 * The allocator service's request (proto/allocation/allocation.proto `AllocationRequest`, JSON as
 * its REST gateway reads it: proto field names, enums by name). Selectors are tried in order;
 * within one, GameServers are searched in Packed order (Allocated first, most used nodes first,
 * then `priorities`: List `Ascending` = least free places = fullest first).
 */
export declare function buildAllocationRequest(roomId: string, p: SelectorParams): Record<string, unknown>;
/** The same allocation as a Kubernetes `GameServerAllocation` object (CRD field names). */
export declare function buildGameServerAllocation(roomId: string, p: SelectorParams): Record<string, unknown>;
/** `address:port` of an allocation (`[address]:port` for an IPv6 address, as a `Host` header has it). */
export declare function defaultFormatHost(a: Allocation): string;
export declare class AgonesScheduler implements Scheduler {
    readonly transport: Transport;
    readonly url: string;
    readonly namespace: string;
    readonly fleet: string;
    readonly listName: string;
    private readonly retry;
    private readonly lock;
    private readonly formatHost;
    private readonly request;
    private readonly inflight;
    private readonly closers;
    private readonly token;
    private readonly tokenFile;
    constructor(options?: AgonesSchedulerOptions);
    /** Allocates a server for the room (reserving its place there) and forgets the answer. */
    createRoom(roomId: string): Promise<void>;
    /**
     * `address:port` of the server that holds the room, or that now does (the allocation added the
     * room to its List); null when no server can take it (the fleet is full). Throws
     * AgonesSchedulerError on any other failure (after retries for the transient ones).
     */
    getRoomHost(roomId: string): Promise<string | null>;
    /**
     * The allocation itself. Concurrent calls for one room in this process share one allocation
     * (the first caller's), so they get the same server.
     */
    allocate(roomId: string): Promise<Allocation | null>;
    /** The request body sent for a room (allocator: AllocationRequest; kubernetes: GameServerAllocation). */
    requestBody(roomId: string): Record<string, unknown>;
    /** Closes idle keep-alive connections of the built-in HTTPS client. */
    close(): void;
    private allocateWithRetries;
    private attempt;
}
export {};
