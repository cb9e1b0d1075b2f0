//! What a room's members are sent: the room's newest snapshot, shared by all of
//! them, and (while it has protocol v2 members) its recent ops batches.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::Instant;

use bytes::Bytes;

/// The newest snapshot of a room, shared by all its members (one encoding, one
/// allocation; each member clones a reference).
pub type SnapshotCell = Option<Arc<Published>>;

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
    /// While the room has v2 members: the ops that lead here from the
    /// previous version, linked to the steps before it the room still keeps
    /// (`None`: no ops lead here).
    pub step: Option<Arc<OpsStep>>,
    /// With `step`: the body of the `ops` message that brings a member from
    /// the previous version to this one (`,"ops":[…]}`), made once for all
    /// of them; `None` if the step's ops are empty.
    pub step_ops: Option<Bytes>,
}

/// Ops steps kept per room: at most this many…
const MAX_BATCHES: usize = 64;
/// …and this many bytes. A v2 member further behind gets a snapshot.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// The ops batch (see `FromWorker::Snapshot`) that leads to one published
/// version from the one before, linked back to the previous step while the
/// room keeps it, so that a v2 member that missed some versions gets their
/// ops instead of a snapshot. Immutable and shared: members read it without
/// a lock, and the room publishes a step without copying the others.
#[derive(Debug)]
pub struct OpsStep {
    version: u64,
    ops: Bytes,
    /// Weak: only the room's [`Batches`] keeps steps alive, so dropping the
    /// oldest one there cuts the chain (a member holding a later one does not
    /// keep the ones before it).
    prev: Weak<OpsStep>,
}

impl OpsStep {
    /// The ops that lead to this step's version from the one before.
    pub fn ops(&self) -> &[u8] {
        &self.ops
    }

    /// The batches that lead from version `from` to this step's version,
    /// oldest first, if the room still keeps them all and together they are
    /// smaller than `limit` bytes.
    pub fn since(&self, from: u64, limit: usize) -> Option<Vec<Bytes>> {
        if from >= self.version {
            return (from == self.version).then(Vec::new);
        }
        let mut out = vec![self.ops.clone()];
        let mut bytes = self.ops.len() + 1;
        let mut prev = self.prev.upgrade();
        let mut version = self.version;
        while version > from + 1 {
            let step = prev?;
            bytes += step.ops.len() + 1;
            if step.version + 1 != version || bytes > limit {
                return None;
            }
            out.push(step.ops.clone());
            version = step.version;
            prev = step.prev.upgrade();
        }
        (bytes <= limit).then(|| {
            out.reverse();
            out
        })
    }
}

/// The steps a room keeps (the newest [`MAX_BATCHES`], within
/// [`MAX_BATCH_BYTES`]), while it has v2 members.
#[derive(Debug, Default)]
pub struct Batches {
    kept: VecDeque<Arc<OpsStep>>,
    bytes: usize,
}

impl Batches {
    /// Records the ops that lead to `version` (`None`: none do, and the
    /// version cannot be reached by ops from an earlier one); returns its step.
    pub(super) fn push(&mut self, version: u64, ops: Option<Bytes>) -> Option<Arc<OpsStep>> {
        let Some(ops) = ops else {
            self.clear();
            return None;
        };
        // A chain goes on only from the version right before.
        let prev = match self.kept.back() {
            Some(last) if last.version + 1 == version => Arc::downgrade(last),
            _ => {
                self.clear();
                Weak::new()
            }
        };
        let step = Arc::new(OpsStep { version, ops, prev });
        self.bytes += step.ops.len();
        self.kept.push_back(step.clone());
        while self.kept.len() > MAX_BATCHES || self.bytes > MAX_BATCH_BYTES {
            let dropped = self.kept.pop_front().expect("not empty");
            self.bytes -= dropped.ops.len();
        }
        Some(step)
    }

    /// Drops every step kept (a push after this starts a new chain).
    pub(super) fn clear(&mut self) {
        self.kept.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::super::room::Room;
    use super::super::testing::*;
    use super::*;

    fn ops(text: &'static str) -> Option<Bytes> {
        Some(Bytes::from_static(text.as_bytes()))
    }

    /// The batches from version `from` to version `to`, as a member at
    /// `from` given the step of `to` would read them.
    fn between(b: &Batches, from: u64, to: u64, limit: usize) -> Option<Vec<Bytes>> {
        let step = b.kept.iter().find(|step| step.version == to)?;
        step.since(from, limit)
    }

    #[test]
    fn batches_lead_from_a_kept_version_to_a_newer_one_or_not_at_all() {
        let mut b = Batches::default();
        assert_eq!(between(&b, 0, 1, 1000), None, "nothing kept");
        b.push(1, None); // a new room: its first snapshot has no ops
        b.push(2, ops("a"));
        b.push(3, ops("b"));
        b.push(4, ops("c"));
        let got = |b: &Batches, from, to| between(b, from, to, 1000).map(|v| v.concat());
        assert_eq!(got(&b, 1, 4).as_deref(), Some(&b"abc"[..]));
        assert_eq!(got(&b, 2, 3).as_deref(), Some(&b"b"[..]));
        assert_eq!(got(&b, 4, 4).as_deref(), Some(&b""[..]), "nothing missed");
        assert_eq!(got(&b, 0, 4), None, "version 1 is not reached by ops");
        assert_eq!(got(&b, 3, 5), None, "not published yet");
        assert_eq!(
            between(&b, 1, 4, 5),
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
        // A member holding an old step does not keep the ones before it.
        let held = b.push(2, ops("x"));
        for v in 3..200 {
            b.push(v, ops("x"));
        }
        assert_eq!(b.kept.len(), MAX_BATCHES);
        assert!(between(&b, 199 - MAX_BATCHES as u64, 199, 1000).is_some());
        assert_eq!(between(&b, 198 - MAX_BATCHES as u64, 199, 1000), None);
        assert_eq!(held.unwrap().prev.upgrade().map(|s| s.version), None);
        let big = Bytes::from(vec![b'y'; MAX_BATCH_BYTES / 2 + 1]);
        b.push(200, Some(big.clone()));
        b.push(201, Some(big));
        assert_eq!(b.kept.len(), 1);
        assert!(b.bytes <= MAX_BATCH_BYTES);
        assert!(between(&b, 200, 201, usize::MAX).is_some());
        assert_eq!(between(&b, 199, 201, usize::MAX), None);
    }

    #[test]
    fn a_room_keeps_batches_only_while_it_has_v2_members() {
        let mut room = Room::new(link("v2"));
        let published = |room: &Room| Published::clone(&room.snapshots.borrow().clone().unwrap());
        let kept = |room: &Room| published(room).step.map(|_| room.batches.kept.len());
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
        let step = published(&room).step.unwrap();
        assert_eq!(step.since(3, 100).unwrap().concat(), b"cd");
        // The step from the previous version, made once for every member.
        let step_ops = published(&room).step_ops;
        assert_eq!(step_ops.as_deref(), Some(&br#","ops":[d]}"#[..]));
        room.publish(Bytes::from_static(b"{}"), ops(""), None);
        assert_eq!(published(&room).step_ops, None, "no ops: nothing to share");
        room.count_v2_member(false);
        assert!(room.batches.kept.is_empty());
        assert_eq!(room.batches.bytes, 0);
        room.publish(Bytes::from_static(b"{}"), ops("e"), None);
        assert_eq!(kept(&room), None, "none kept without v2 members");
        assert!(room.batches.kept.is_empty());
    }
}
