//! What lets a room outlive its worker. Every event is stamped with the room's
//! next sequence number and kept in the room's [`Journal`] until the worker's
//! next checkpoint covers it; if the worker fails, the checkpoint and the
//! journal rebuild the room exactly on its replacement (`restore`). A room
//! blamed for repeated crashes is closed alone, and a room that cannot be
//! rebuilt exactly is closed rather than rebuilt wrong.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::journal::{Journal, Recorded};
use crate::worker_queue::{Charge, Ticket};
use contract::ipc::{RoomEvent, RoomId, Stamped, ToWorker};
use contract::protocol::unix_time_ms;

/// A room blamed for this many worker crashes within [`POISON_WINDOW`] is closed.
pub const POISON_CRASHES: usize = 3;
/// How long a crash counts against a room: blames older than this are forgotten.
pub const POISON_WINDOW: Duration = Duration::from_secs(60);

/// A room's stamping, checkpoint, journal, restore progress and crash blame
/// (see [`Room`](super::room::Room)).
#[derive(Default)]
pub(super) struct Recovery {
    /// Last sequence number stamped for this room.
    pub(super) last_seq: u64,
    /// Seed of the room's current instance on its worker.
    pub(super) id_seed: u64,
    /// The worker's latest checkpoint: (last frame it covers, opaque image).
    pub(super) checkpoint: Option<(u64, Vec<u8>)>,
    /// Every event stamped after the checkpoint, in order: with the checkpoint
    /// it rebuilds the room exactly if its worker fails.
    pub(super) journal: Journal,
    /// The journal asked for a checkpoint; sent with the room's next frame.
    pub(super) checkpoint_wanted: bool,
    /// The room's worker failed and the room is not restored yet: events are
    /// journaled but not sent.
    pub(super) restoring: bool,
    /// Last journaled seq already sent to the replacement during a restore.
    pub(super) restore_sent: u64,
    /// Worker crashes attributed to this room.
    pub(super) blames: Vec<Instant>,
    /// When a hang of its worker was last suspected to be its doing (several
    /// rooms were being restored then).
    pub(super) suspected_at: Option<Instant>,
    /// Last event covered by a save the worker confirmed (0: none yet).
    pub(super) saved_seq: u64,
    /// While restoring: each journaled client message's share of the
    /// worker's byte budget, by seq, kept until the restore sends the
    /// message. An outage then holds the senders back (their clients' TCP)
    /// at the budget instead of letting the journal grow to its bound (which
    /// would close the room, 1011).
    pub(super) held: VecDeque<(u64, Charge)>,
}

/// The ticket to send journaled event `seq` with: its held charge, if any
/// (charges of events before it that were not sent are given back).
pub(super) fn held_ticket(held: &mut VecDeque<(u64, Charge)>, seq: u64) -> Ticket {
    while held.front().is_some_and(|(s, _)| *s < seq) {
        held.pop_front();
    }
    match held.front() {
        Some((s, _)) if *s == seq => Ticket::Charge(held.pop_front().expect("front").1),
        _ => Ticket::None,
    }
}

impl Recovery {
    /// Stamps an event and records it in the journal.
    pub(super) fn stamp(&mut self, room: &RoomId, event: RoomEvent) -> ToWorker {
        self.last_seq += 1;
        let stamped = Stamped {
            room: room.clone(),
            seq: self.last_seq,
            time_ms: unix_time_ms(),
            event,
        };
        if self.journal.record(&stamped) == Recorded::WantsCheckpoint {
            self.checkpoint_wanted = true;
        }
        if !self.journal.restorable() {
            // Dropped events are never sent: their charges go back.
            self.held.clear();
        }
        ToWorker::Event(stamped)
    }

    /// A copy of what rebuilds the room.
    pub(super) fn salvage(&self, room: &RoomId, quarantined: bool) -> RoomSalvage {
        RoomSalvage {
            room: room.clone(),
            id_seed: self.id_seed,
            image: self.checkpoint.as_ref().map(|(_, image)| image.clone()),
            events: self.journal.stamped(room).collect(),
            complete: self.journal.restorable(),
            quarantined,
        }
    }

    /// Whether the room has had an instance on a worker (a seed). A room
    /// placed while its slot's worker was down has none until its first join.
    pub(super) fn has_instance(&self) -> bool {
        self.id_seed != 0
    }

    /// Whether the room was blamed for, or suspected of, a crash within
    /// [`POISON_WINDOW`]: it is restored alone.
    pub(super) fn suspect(&self, now: Instant) -> bool {
        let recent = |at: &Instant| now.duration_since(*at) < POISON_WINDOW;
        self.blames.iter().any(recent) || self.suspected_at.as_ref().is_some_and(recent)
    }

    /// Starts a new instance of the room on its worker (not a reopening of one
    /// that is still closing, which keeps its state).
    pub(super) fn new_instance(&mut self) -> u64 {
        // Never 0: that is a room with no instance yet (see `has_instance`).
        self.id_seed = rand::random::<u64>().max(1);
        self.checkpoint = None;
        self.journal.clear();
        self.held.clear();
        self.id_seed
    }
}

/// What rebuilds a room without its worker: its last checkpoint and the events
/// after it, everything its members saw acknowledged. Taken from a room closed
/// because it kept crashing its workers, or copied from one whose worker was
/// lost during a stop, for a salvage into a fallback file.
#[derive(Debug)]
pub struct RoomSalvage {
    /// The room.
    pub room: RoomId,
    /// The seed of its instance.
    pub id_seed: u64,
    /// Its worker's last checkpoint, if any.
    pub image: Option<Vec<u8>>,
    /// The journal after the checkpoint.
    pub events: Vec<Stamped>,
    /// False if the journal had overflowed (events since the checkpoint were
    /// dropped): the replay then misses some.
    pub complete: bool,
    /// Closed as poison (rather than lost with its worker during a stop).
    pub quarantined: bool,
}

/// Beyond the load wait, how long a restoring room may take to answer.
pub const RESTORE_ANSWER_MARGIN: Duration = Duration::from_secs(2);

/// The restores of a slot's rooms into its current process.
#[derive(Default)]
pub(super) struct Restores {
    /// Suspects waiting their turn (restored one at a time, after the others).
    pub(super) waiting: VecDeque<RoomId>,
    /// Restores sent and not answered yet.
    pub(super) in_flight: HashMap<RoomId, InFlight>,
    /// How long a restore may wait for its answer.
    pub(super) wait: Duration,
    /// When this round started, its rooms and suspects (for its log line).
    pub(super) round: Option<(Instant, usize, usize)>,
}

/// A room's restore, from its first frame to the worker's `Synced`.
pub(super) struct InFlight {
    /// The token of the restore's `Sync`.
    pub(super) token: u64,
    /// Set by the writer when it takes the room's `RestoreRoom`: from then on
    /// the worker may be applying the room's frames.
    pub(super) taken: Arc<AtomicBool>,
    /// When it stops waiting for the answer and goes on.
    pub(super) until: Instant,
}
