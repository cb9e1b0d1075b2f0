//! What a room's members are sent: the room's newest snapshot, shared by all of
//! them, and (while it has protocol v2 members) its recent ops batches.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::room::Room;

/// The newest snapshot of a room, shared by all its members (one encoding, one
/// allocation; each member clones a reference).
pub type SnapshotCell = Option<Published>;

/// A snapshot as published to a room's members.
#[derive(Clone, Debug)]
pub struct Published {
    /// The snapshot's JSON, shared by every member's session.
    pub message: Bytes,
    /// For members that negotiated permessage-deflate: the snapshot without
    /// its `{`, as DEFLATE segments (see `FromWorker::Snapshot`), shared too.
    pub deflated: Option<Bytes>,
    /// When the supervisor received it (for the fan-out latency).
    pub at: Instant,
    /// Counts the room's snapshots, so a member can tell how many it skipped.
    pub version: u64,
    /// The room's recent ops batches up to this version, while it has v2
    /// members (shared: one copy per publish, read by each v2 member without
    /// a lock).
    pub batches: Option<Arc<Batches>>,
    /// While it has v2 members: the body of the `ops` message that brings a
    /// member from the previous version to this one (`,"ops":[…]}`), made
    /// once for all of them; `None` if no ops lead here, or they are empty.
    pub step_ops: Option<Bytes>,
}

/// Batches of protocol v2 ops kept per room: at most this many…
const MAX_BATCHES: usize = 64;
/// …and this many bytes. A v2 member further behind gets a snapshot.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// A room's recent ops batches (see `FromWorker::Snapshot`), one per published
/// version, so that a v2 member that missed some versions gets their ops
/// instead of a snapshot. Kept only while the room has v2 members.
#[derive(Clone, Debug, Default)]
pub struct Batches {
    /// The snapshot of this version cannot be reached by ops from an earlier
    /// one (the room was new or restored, or no batches were kept before it).
    base: u64,
    /// Ops of versions `base + 1 ..`, consecutive, oldest first.
    entries: VecDeque<(u64, Bytes)>,
    bytes: usize,
}

impl Batches {
    /// Records the ops that lead to `version` (`None`: none do).
    pub(super) fn push(&mut self, version: u64, ops: Option<Bytes>) {
        let Some(ops) = ops else {
            self.reset(version);
            return;
        };
        if self.entries.back().map_or(self.base, |(v, _)| *v) + 1 != version {
            self.reset(version - 1);
        }
        self.bytes += ops.len();
        self.entries.push_back((version, ops));
        while self.entries.len() > MAX_BATCHES || self.bytes > MAX_BATCH_BYTES {
            let (v, dropped) = self.entries.pop_front().expect("not empty");
            self.bytes -= dropped.len();
            self.base = v;
        }
    }

    /// Drops every batch kept (a push after this starts a new chain).
    pub(super) fn clear(&mut self) {
        let base = self.base;
        self.reset(base);
    }

    fn reset(&mut self, base: u64) {
        self.base = base;
        self.entries.clear();
        self.bytes = 0;
    }

    /// The batches that lead from version `from` to version `to`, if all are
    /// kept and together smaller than `limit` bytes.
    pub fn between(&self, from: u64, to: u64, limit: usize) -> Option<Vec<Bytes>> {
        let first = self.entries.front()?.0;
        if from < self.base || from + 1 < first || to < from {
            return None;
        }
        let start = (from + 1 - first) as usize;
        let count = (to - from) as usize;
        if start + count > self.entries.len() {
            return None;
        }
        let mut bytes = 0;
        let mut out = Vec::with_capacity(count);
        for (_, ops) in self.entries.range(start..start + count) {
            bytes += ops.len() + 1;
            if bytes > limit {
                return None;
            }
            out.push(ops.clone());
        }
        Some(out)
    }
}

impl Room {
    /// Publishes the room's newest snapshot to its members, and for v2 members
    /// the ops that lead to it from the previous one (`None`: none do).
    pub(super) fn publish(&mut self, snapshot: Bytes, ops: Option<Bytes>, deflated: Option<Bytes>) {
        let version = self
            .snapshots
            .borrow()
            .as_ref()
            .map_or(1, |p| p.version + 1);
        // Without v2 members, none are kept: a v2 member counts itself with
        // its join, and its first message is a snapshot; the first batch kept
        // after a pause starts a new chain (see `Batches::push`).
        let (batches, step_ops) = if self.v2_members > 0 {
            let step_ops = ops
                .as_ref()
                .filter(|ops| !ops.is_empty())
                .map(|ops| Bytes::from(contract::protocol::v2::ops_body([&ops[..]])));
            self.batches.push(version, ops);
            (Some(Arc::new(self.batches.clone())), step_ops)
        } else {
            (None, None)
        };
        self.snapshots.send_replace(Some(Published {
            message: snapshot,
            deflated,
            at: Instant::now(),
            version,
            batches,
            step_ops,
        }));
    }

    /// A v2 member joins (`true`) or leaves.
    pub(super) fn count_v2_member(&mut self, joins: bool) {
        if joins {
            self.v2_members += 1;
        } else {
            self.v2_members -= 1;
            if self.v2_members == 0 {
                // Its batches would only hold memory.
                self.batches.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn ops(text: &'static str) -> Option<Bytes> {
        Some(Bytes::from_static(text.as_bytes()))
    }

    #[test]
    fn batches_lead_from_a_kept_version_to_a_newer_one_or_not_at_all() {
        let mut b = Batches::default();
        assert_eq!(b.between(0, 1, 1000), None, "nothing kept");
        b.push(1, None); // a new room: its first snapshot has no ops
        b.push(2, ops("a"));
        b.push(3, ops("b"));
        b.push(4, ops("c"));
        let got = |b: &Batches, from, to| b.between(from, to, 1000).map(|v| v.concat());
        assert_eq!(got(&b, 1, 4).as_deref(), Some(&b"abc"[..]));
        assert_eq!(got(&b, 2, 3).as_deref(), Some(&b"b"[..]));
        assert_eq!(got(&b, 4, 4).as_deref(), Some(&b""[..]), "nothing missed");
        assert_eq!(got(&b, 0, 4), None, "version 1 is not reached by ops");
        assert_eq!(got(&b, 3, 5), None, "not published yet");
        assert_eq!(
            b.between(1, 4, 5),
            None,
            "more than the limit: a snapshot is smaller"
        );
        // A restore: the chain starts again at its first snapshot.
        b.push(5, None);
        b.push(6, ops("d"));
        assert_eq!(got(&b, 4, 6), None);
        assert_eq!(got(&b, 5, 6).as_deref(), Some(&b"d"[..]));
        // Versions published while no v2 session was there were not kept.
        b.push(9, ops("g"));
        assert_eq!(got(&b, 6, 9), None);
        assert_eq!(got(&b, 8, 9).as_deref(), Some(&b"g"[..]));
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let mut b = Batches::default();
        b.push(1, None);
        for v in 2..200 {
            b.push(v, ops("x"));
        }
        assert_eq!(b.entries.len(), MAX_BATCHES);
        assert!(b.between(199 - MAX_BATCHES as u64, 199, 1000).is_some());
        assert_eq!(b.between(198 - MAX_BATCHES as u64, 199, 1000), None);
        let big = Bytes::from(vec![b'y'; MAX_BATCH_BYTES / 2 + 1]);
        b.push(200, Some(big.clone()));
        b.push(201, Some(big));
        assert_eq!(b.entries.len(), 1);
        assert!(b.bytes <= MAX_BATCH_BYTES);
        assert!(b.between(200, 201, usize::MAX).is_some());
        assert_eq!(b.between(199, 201, usize::MAX), None);
    }

    #[test]
    fn a_room_keeps_batches_only_while_it_has_v2_members() {
        let mut room = Room::new(link("v2"));
        let kept = |room: &Room| {
            let published = room.snapshots.borrow().clone().unwrap();
            published.batches.map(|b| b.entries.len())
        };
        room.publish(Bytes::from_static(b"{}"), None, None);
        assert_eq!(kept(&room), None);
        room.count_v2_member(true);
        room.count_v2_member(true);
        for n in ["a", "b", "c"] {
            room.publish(Bytes::from_static(b"{}"), ops(n), None);
        }
        assert_eq!(kept(&room), Some(3));
        room.count_v2_member(false);
        room.publish(Bytes::from_static(b"{}"), ops("d"), None);
        assert_eq!(kept(&room), Some(4), "one v2 member is left");
        // The step from the previous version, made once for every member.
        let step = room.snapshots.borrow().as_ref().unwrap().step_ops.clone();
        assert_eq!(step.as_deref(), Some(&br#","ops":[d]}"#[..]));
        room.publish(Bytes::from_static(b"{}"), ops(""), None);
        let step = room.snapshots.borrow().as_ref().unwrap().step_ops.clone();
        assert_eq!(step, None, "no ops: nothing to share");
        room.count_v2_member(false);
        assert!(room.batches.entries.is_empty());
        assert_eq!(room.batches.bytes, 0);
        room.publish(Bytes::from_static(b"{}"), ops("e"), None);
        assert_eq!(kept(&room), None, "none kept without v2 members");
        assert!(room.batches.entries.is_empty());
    }
}
