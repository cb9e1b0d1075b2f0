// Type-level checks of the public API (compiled with `tsc --noEmit` by `npm test`):
// it must accept the browser's WebSocket (DOM lib) and the `ws` package's, and
// its state must be usable as the v1 snapshot type a client already has.
import WsWebSocket from "ws";
import {
  applyFrame, connect, initialSync, SessionClient,
  type ApplyResult, type BoardSessionData, type CursorPosition, type CloseInfo, type Cursor, type Protocol, type RoomState, type RoomConnection, type Shape,
} from "../src/index.js";

// What a v1 client declares today (PROTOCOL.md §4).
type V1Cursor = { userId: string; x: number; y: number; timestamp: string };
type V1Shape = { id: string; type: string; x: number; y: number; width: number; height: number; userId: string;
  timestamp: string; text?: string; fill: string; stroke: string; rotation: number };
interface V1Snapshot {
  connectedUsers: string[];
  cursors: V1Cursor[];
  shapes: V1Shape[];
}
// The same with readonly arrays: what it must declare to take the client's state
// as it is (RoomState's arrays are readonly: they are shared between states).
interface ReadonlyV1Snapshot {
  readonly connectedUsers: readonly string[];
  readonly cursors: readonly V1Cursor[];
  readonly shapes: readonly V1Shape[];
}

const browser: RoomConnection = connect("ws://h/?token=t", { WebSocket: WebSocket });
const node: RoomConnection = connect("ws://h/?token=t", { WebSocket: WsWebSocket, protocol: "v1" });
const snapshot: ReadonlyV1Snapshot = browser.state;
// @ts-expect-error: TypeScript never lets a readonly array pass for a mutable one
const mutable: V1Snapshot = browser.state;
// A copy is a mutable v1 snapshot.
const copied: V1Snapshot = { connectedUsers: [...browser.state.connectedUsers], cursors: [...browser.state.cursors],
  shapes: [...browser.state.shapes] };
const room: RoomState = node.getState();
// @ts-expect-error: the state's arrays cannot be modified
room.shapes.push(room.shapes[0]);
const cursors: readonly Cursor[] = room.cursors;
const shapes: readonly Shape[] = snapshot.shapes.length ? room.shapes : [];
const unsubscribe: () => void = node.subscribe((state: RoomState) => void state.shapes);
const opened: Promise<Protocol> = node.opened;
const closed: Promise<CloseInfo> = node.closed;
const result: ApplyResult = applyFrame(initialSync(), "{}", "v2");
node.createShape({ shapeType: "oval", x: 0, y: 0, width: 1, height: 1 });
node.updateShape("id", { rotation: 5 });
// @ts-expect-error: not a shape type
node.createShape({ shapeType: "hexagon", x: 0, y: 0, width: 1, height: 1 });
// @ts-expect-error: a client cannot choose a shape's id
node.send({ type: "shape_update", shapeId: "a", id: "b" });
node.close(1001); // any number: the client turns what a browser refuses into 1000
connect("ws://h/?token=t", { onError: (e: unknown) => void e, resyncRetryMs: 50, fallbackRetryMs: 50 });

// The public React client's Session.tsx, as it uses its own SessionClient (the
// names it imports from "../sessionClient" are all here).
async function sessionTsx(host: string, token: string): Promise<void> {
  const client = SessionClient.create(host);
  let board: BoardSessionData | null = null;
  client.onMessage((data: BoardSessionData) => (board = data));
  client.onClose(() => void "Disconnected");
  await client.connect(token, 45000);
  client.sendCursorMove(1, 2);
  client.sendShapeCreate("rectangle", 0, 0, 10, 10, { fill: "#fff" });
  client.sendShapeCreate("text", 0, 0, 10, 10, { text: "hi", fill: undefined, stroke: "" });
  client.sendShapeUpdate("id", { x: 5, text: "t" });
  client.sendShapeDelete("id");
  const cursor: CursorPosition | undefined = (board as BoardSessionData | null)?.cursors[0];
  const where: string = client.host;
  client.close();
  void [cursor, where];
}
void [cursors, shapes, unsubscribe, opened, closed, result, mutable, copied, sessionTsx];
