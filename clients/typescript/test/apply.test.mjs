// Unit tests of the apply logic (PROTOCOL-v2.md §2) with hand-written frames.
import { test } from "node:test";
import assert from "node:assert/strict";
import { applyFrame, applyOps, initialSync, EMPTY_ROOM } from "../build/index.js";

const T0 = "2026-01-01T12:00:00.000Z";
const T1 = "2026-01-01T12:00:01.000Z";
const T2 = "2026-01-01T12:00:02.000Z";
const rect = (id, userId = "alice", extra = {}) => ({
  id, type: "rectangle", x: 0, y: 0, width: 10, height: 10, userId, timestamp: T0,
  fill: "#3b82f6", stroke: "#1d4ed8", rotation: 0, ...extra,
});
const snapshot = (seq, room) => JSON.stringify({ type: "snapshot", seq, ...room });
const ops = (seq, list) => JSON.stringify({ type: "ops", seq, ops: list });

/** Feeds frames in order; returns the final result and every result. */
function feed(frames, protocol = "v2", sync = initialSync()) {
  const results = [];
  for (const frame of frames) {
    const result = applyFrame(sync, frame, protocol);
    results.push(result);
    sync = result.sync;
  }
  return { sync, results, resyncs: results.filter((r) => r.resync).length };
}

const room1 = {
  connectedUsers: ["alice", "bob"],
  cursors: [{ userId: "alice", x: 1, y: 2, timestamp: T0 }],
  shapes: [rect("s1"), rect("s2", "bob", { text: "hi" })],
};

test("a snapshot replaces the state, without its type and seq, and sets lastSeq", () => {
  const { sync, results } = feed([snapshot(7, room1)]);
  assert.deepEqual(sync.state, room1);
  assert.deepEqual(Object.keys(sync.state).sort(), ["connectedUsers", "cursors", "shapes"]);
  assert.equal(sync.lastSeq, 7);
  assert.equal(results[0].changed, true);
  assert.equal(results[0].resync, false);
  // A later snapshot replaces everything, whatever its seq.
  const again = feed([snapshot(3, { connectedUsers: ["carol"], cursors: [], shapes: [] })], "v2", sync);
  assert.deepEqual(again.sync.state, { connectedUsers: ["carol"], cursors: [], shapes: [] });
  assert.equal(again.sync.lastSeq, 3);
});

test("every op kind, applied in order, gives the v1 snapshot", () => {
  const { sync, resyncs } = feed([
    snapshot(0, room1),
    ops(1, [
      { op: "join", userId: "carol" },
      { op: "cursor", userId: "carol", x: 5, y: 6, timestamp: T1 },
      { op: "cursor", userId: "alice", x: 7, y: 8, timestamp: T1 },
      { op: "add", shape: rect("s3", "carol") },
      { op: "update", id: "s1", set: { x: 40, text: "new", timestamp: T1 } },
    ]),
    ops(2, [
      { op: "remove", id: "s2" },
      { op: "leave", userId: "alice" },
      { op: "update", id: "s3", set: { width: 99, timestamp: T2 } },
    ]),
  ]);
  assert.equal(resyncs, 0);
  assert.equal(sync.lastSeq, 2);
  assert.deepEqual(sync.state, {
    connectedUsers: ["bob", "carol"],
    // alice's cursor went with her; carol's stays where it was appended.
    cursors: [{ userId: "carol", x: 5, y: 6, timestamp: T1 }],
    shapes: [
      rect("s1", "alice", { x: 40, text: "new", timestamp: T1 }),
      rect("s3", "carol", { width: 99, timestamp: T2 }),
    ],
  });
});

test("a cursor op moves an existing cursor in place and appends a new one", () => {
  const start = { connectedUsers: ["a", "b", "c"], cursors: [
    { userId: "a", x: 0, y: 0, timestamp: T0 }, { userId: "b", x: 0, y: 0, timestamp: T0 }], shapes: [] };
  const next = applyOps(start, [
    { op: "cursor", userId: "a", x: 1, y: 1, timestamp: T1 },
    { op: "cursor", userId: "c", x: 2, y: 2, timestamp: T1 },
  ]);
  assert.deepEqual(next.cursors.map((c) => [c.userId, c.x]), [["a", 1], ["b", 0], ["c", 2]]);
});

test("ops inside a batch are applied in order (add then update, update then remove, leave then join)", () => {
  const start = { connectedUsers: ["a"], cursors: [{ userId: "a", x: 0, y: 0, timestamp: T0 }], shapes: [] };
  const next = applyOps(start, [
    { op: "add", shape: rect("n", "a") },
    { op: "update", id: "n", set: { x: 1, timestamp: T1 } },
    { op: "update", id: "n", set: { x: 2, timestamp: T2 } },
    { op: "add", shape: rect("m", "a") },
    { op: "remove", id: "n" },
    { op: "leave", userId: "a" },
    { op: "join", userId: "a" },
  ]);
  assert.deepEqual(next, { connectedUsers: ["a"], cursors: [], shapes: [rect("m", "a")] });
  // In the other order the same ops fail: an update of a shape not yet added.
  const wrong = applyOps(start, [
    { op: "update", id: "n", set: { x: 1, timestamp: T1 } },
    { op: "add", shape: rect("n", "a") },
  ]);
  assert.match(wrong.error, /update of unknown shape n/);
});

test("applying never modifies the previous state (new arrays and objects for what changed)", () => {
  const first = feed([snapshot(0, structuredClone(room1))]).sync;
  const frozen = structuredClone(first.state);
  const next = feed([ops(1, [
    { op: "update", id: "s1", set: { x: 5, timestamp: T1 } },
    { op: "cursor", userId: "alice", x: 9, y: 9, timestamp: T1 },
    { op: "leave", userId: "bob" },
  ])], "v2", first).sync;
  assert.deepEqual(first.state, frozen);
  assert.notEqual(next.state, first.state);
  assert.notEqual(next.state.shapes, first.state.shapes);
  assert.notEqual(next.state.shapes[0], first.state.shapes[0]);
  assert.equal(next.state.shapes[1], first.state.shapes[1], "an untouched shape is shared");
  // An empty batch changes nothing but lastSeq.
  const empty = applyFrame(next, ops(2, []), "v2");
  assert.equal(empty.changed, false);
  assert.equal(empty.sync.state, next.state);
  assert.equal(empty.sync.lastSeq, 2);
});

test("a gap asks for one resync and ignores ops until the next snapshot", () => {
  const { sync, results } = feed([
    snapshot(10, room1),
    ops(11, [{ op: "update", id: "s1", set: { x: 1, timestamp: T1 } }]),
    ops(13, [{ op: "update", id: "s1", set: { x: 3, timestamp: T1 } }]), // 12 is missing
    ops(14, [{ op: "update", id: "s1", set: { x: 4, timestamp: T1 } }]),
    ops(12, [{ op: "update", id: "s1", set: { x: 2, timestamp: T1 } }]),
  ]);
  assert.deepEqual(results.map((r) => r.resync), [false, false, true, false, false]);
  assert.match(results[2].problem, /gap: ops seq 13 after 11/);
  assert.equal(sync.awaitingSnapshot, true);
  assert.equal(sync.lastSeq, 11);
  assert.equal(sync.state.shapes[0].x, 1, "nothing after the gap was applied");

  // The snapshot ends the wait; ops continue from its seq.
  const after = feed([
    snapshot(20, { ...room1, shapes: [rect("s1", "alice", { x: 20 })] }),
    ops(21, [{ op: "update", id: "s1", set: { x: 21, timestamp: T2 } }]),
  ], "v2", sync);
  assert.equal(after.resyncs, 0);
  assert.equal(after.sync.awaitingSnapshot, false);
  assert.equal(after.sync.lastSeq, 21);
  assert.equal(after.sync.state.shapes[0].x, 21);
});

test("a stale or duplicate seq is a gap too (PROTOCOL-v2.md: any other seq)", () => {
  for (const seq of [5, 4, 0]) {
    const { sync, results } = feed([
      snapshot(4, room1),
      ops(5, [{ op: "update", id: "s1", set: { x: 5, timestamp: T1 } }]),
      ops(seq, [{ op: "update", id: "s1", set: { x: 99, timestamp: T1 } }]),
    ]);
    assert.deepEqual(results.map((r) => r.resync), [false, false, true], `seq ${seq}`);
    assert.equal(sync.state.shapes[0].x, 5, `seq ${seq} must not be applied`);
    assert.equal(sync.lastSeq, 5);
  }
});

test("ops before the first snapshot ask for a resync and are not applied", () => {
  const { sync, results } = feed([
    ops(0, [{ op: "join", userId: "alice" }]),
    ops(1, [{ op: "join", userId: "bob" }]),
  ]);
  assert.deepEqual(results.map((r) => r.resync), [true, false]);
  assert.deepEqual(sync.state, EMPTY_ROOM);
});

test("an op naming an unknown user or shape asks for a resync; the batch is not applied", () => {
  const cases = [
    [{ op: "update", id: "nope", set: { x: 1, timestamp: T1 } }, /update of unknown shape nope/],
    [{ op: "remove", id: "nope" }, /remove of unknown shape nope/],
    [{ op: "leave", userId: "zed" }, /leave of unknown user zed/],
    [{ op: "cursor", userId: "zed", x: 1, y: 1, timestamp: T1 }, /cursor of unknown user zed/],
    [{ op: "join", userId: "bob" }, /join of bob, already connected/],
    [{ op: "add", shape: rect("s2") }, /add of s2, already there/],
    [{ op: "teleport", id: "s1" }, /unknown op "teleport"/],
    [{ op: "cursor", userId: "alice", x: "1", y: 1, timestamp: T1 }, /cursor without/],
  ];
  for (const [bad, problem] of cases) {
    const { sync, results } = feed([
      snapshot(1, room1),
      ops(2, [{ op: "update", id: "s1", set: { x: 77, timestamp: T1 } }, bad]),
      ops(3, [{ op: "update", id: "s1", set: { x: 78, timestamp: T1 } }]),
    ]);
    assert.deepEqual(results.map((r) => r.resync), [false, true, false], JSON.stringify(bad));
    assert.match(results[1].problem, problem);
    assert.deepEqual(sync.state, room1, `${JSON.stringify(bad)}: nothing of the batch or after it applied`);
    assert.equal(sync.awaitingSnapshot, true);
  }
});

test("an unreadable v2 frame asks for a resync; an unknown message type is ignored", () => {
  const start = feed([snapshot(1, room1)]).sync;
  for (const frame of ["{not json", "[1,2]", "42", JSON.stringify({ type: "snapshot", shapes: [] }),
    JSON.stringify({ type: "ops", seq: 2 }), JSON.stringify({ type: "ops", seq: -1, ops: [] })]) {
    const result = applyFrame(start, frame, "v2");
    assert.equal(result.resync, true, frame);
    assert.equal(result.sync.state, start.state, frame);
  }
  const unknown = applyFrame(start, JSON.stringify({ type: "hello", seq: 2 }), "v2");
  assert.equal(unknown.resync, false);
  assert.equal(unknown.sync, start);
  assert.match(unknown.problem, /unknown type "hello"/);
  // The next batch still applies.
  assert.equal(applyFrame(unknown.sync, ops(2, [{ op: "remove", id: "s1" }]), "v2").sync.state.shapes.length, 1);
});

test("a v2 error message is counted, changes nothing and takes no seq", () => {
  const start = feed([snapshot(1, room1)]).sync;
  const error = applyFrame(start, JSON.stringify({ type: "error", op: "shape_create", reason: "board_full", count: 3 }), "v2");
  assert.equal(error.sync, start);
  assert.equal(error.resync, false);
  assert.equal(error.problem, undefined);
  assert.deepEqual(error.refused, { op: "shape_create", reason: "board_full", count: 3 });
  // The next batch follows the snapshot's seq, as if the error were not there.
  assert.equal(applyFrame(error.sync, ops(2, [{ op: "remove", id: "s1" }]), "v2").sync.state.shapes.length, 1);
  const bad = applyFrame(start, JSON.stringify({ type: "error", op: 1 }), "v2");
  assert.equal(bad.resync, false);
  assert.match(bad.problem, /error without/);
});

test("v1: every message is a full snapshot; no resync is ever asked", () => {
  const a = JSON.stringify(room1);
  const b = JSON.stringify({ connectedUsers: ["bob"], cursors: [], shapes: [rect("s9", "bob")] });
  const { sync, results } = feed([a, "{garbage", JSON.stringify({ type: "ops", seq: 1, ops: [] }), b], "v1");
  assert.deepEqual(results.map((r) => [r.changed, r.resync]), [[true, false], [false, false], [false, false], [true, false]]);
  assert.deepEqual(sync.state, JSON.parse(b));
  assert.equal(sync.lastSeq, null);
});

// A swap-remove (move the last item into the hole) passes every test above:
// these put the removed item first, with two or more after it.
test("remove keeps the order of the other shapes (the first of several removed)", () => {
  const start = { connectedUsers: ["a"], cursors: [], shapes: [rect("s1", "a"), rect("s2", "a"), rect("s3", "a"), rect("s4", "a")] };
  const next = applyOps(start, [{ op: "remove", id: "s1" }]);
  assert.deepEqual(next.shapes.map((s) => s.id), ["s2", "s3", "s4"]);
  const middle = applyOps(next, [{ op: "remove", id: "s3" }, { op: "add", shape: rect("s5", "a") }]);
  assert.deepEqual(middle.shapes.map((s) => s.id), ["s2", "s4", "s5"]);
});

test("leave keeps the order of the other users and of the other cursors", () => {
  const cursor = (userId) => ({ userId, x: 1, y: 1, timestamp: T0 });
  // a joined first and moved first: both its entries sit before two others.
  const start = { connectedUsers: ["a", "b", "c", "d"], cursors: [cursor("a"), cursor("c"), cursor("b")], shapes: [] };
  const next = applyOps(start, [{ op: "leave", userId: "a" }]);
  assert.deepEqual(next.connectedUsers, ["b", "c", "d"]);
  assert.deepEqual(next.cursors.map((c) => c.userId), ["c", "b"]);
  // A user without a cursor leaves from the front: the cursors are untouched.
  const again = applyOps(next, [{ op: "leave", userId: "b" }, { op: "join", userId: "e" }]);
  assert.deepEqual(again.connectedUsers, ["c", "d", "e"]);
  assert.deepEqual(again.cursors.map((c) => c.userId), ["c"]);
});

test("no two connections share a starting state; EMPTY_ROOM is frozen all the way down", () => {
  const a = initialSync();
  const b = initialSync();
  a.state.shapes.push(rect("stray"));
  a.state.connectedUsers.push("stray");
  a.state.cursors.push({ userId: "stray", x: 0, y: 0, timestamp: T0 });
  assert.deepEqual(b.state, { connectedUsers: [], cursors: [], shapes: [] });
  assert.deepEqual(initialSync().state, { connectedUsers: [], cursors: [], shapes: [] });
  assert.deepEqual(EMPTY_ROOM, { connectedUsers: [], cursors: [], shapes: [] });
  for (const key of ["connectedUsers", "cursors", "shapes"]) {
    assert.ok(Object.isFrozen(EMPTY_ROOM[key]), `EMPTY_ROOM.${key} is frozen`);
    assert.throws(() => EMPTY_ROOM[key].push("x"), TypeError);
  }
});

test("an update never changes a shape's id (an `id` in `set` is ignored, the rest applies)", () => {
  const start = { connectedUsers: ["a"], cursors: [], shapes: [rect("s1", "a"), rect("s2", "a")] };
  const next = applyOps(start, [{ op: "update", id: "s1", set: { id: "s2", x: 33, timestamp: T1 } }]);
  assert.deepEqual(next.shapes, [rect("s1", "a", { x: 33, timestamp: T1 }), rect("s2", "a")]);
  // The shape is still found by its id afterwards.
  const after = applyOps(next, [{ op: "update", id: "s1", set: { y: 7, timestamp: T2 } }]);
  assert.equal(after.shapes[0].y, 7);
  assert.equal(after.shapes[1].y, 0);
});
