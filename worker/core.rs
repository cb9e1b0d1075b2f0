//! The worker's logic without its socket: rooms, their loads and saves, and the
//! replies they produce. The IPC loop (`lib.rs`) feeds it frames, store results
//! and clock ticks, and sends what it outputs; tests drive it the same way with a
//! fake store and a paused clock.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexSet;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::persist::{LoadRetry, Policy, SaveState};
use super::room::{Effect, Ignored, Room, RoomImage};
use super::store::{BoardId, BoardStore, LoadedBoard, SaveOutcome, StoreError, fallback};
use contract::config::PersistSettings;
use contract::ipc::{
    ConnId, Fallback, FromWorker, RoomEvent, RoomId, RoomSummary, SaveResult, Stamped, ToWorker,
};
use contract::protocol::{IgnoredReason, MessageKind};

/// Events held per room while its load is pending. Past this, members are
/// admitted at once (degraded) rather than buffering without bound.
const MAX_HELD_EVENTS: usize = 10_000;

/// Failed save (or load) attempts, after every member has left, before a room's
/// unsaved shapes go to a fallback file and the room is freed. With the retry
/// backoff (0.5, 1, 2, 4 s) that is about 8 s of trying: a short outage costs
/// nothing, and a store that keeps refusing a room cannot hold its capacity.
pub const MAX_CLOSING_ATTEMPTS: u32 = 5;

/// Ids named in a log line about cut shapes (all of them are in the file).
const MAX_LOGGED_IDS: usize = 20;

/// The outcome of a store task, sent back to the loop.
#[derive(Debug)]
pub enum StoreResult {
    /// A board load ended.
    Loaded {
        /// The room it was for.
        room: RoomId,
        /// The room instance that started it: a result for a freed one is dropped.
        instance: u64,
        /// The board, or why not.
        result: Result<LoadedBoard, StoreError>,
    },
    /// A save ended.
    Saved {
        /// The room it was for.
        room: RoomId,
        /// The room instance that started it: a result for a freed one is dropped.
        instance: u64,
        /// Last frame covered by the save.
        seq: u64,
        /// Checkpoint of the room as saved, sent to the supervisor on success.
        image: Vec<u8>,
        /// The previous attempt had failed.
        retry: bool,
        /// How long the store took.
        took: Duration,
        /// What the store did, or why it failed.
        result: Result<SaveOutcome, StoreError>,
    },
}

/// What a checkpoint holds: the room, and what persisting it needs.
#[derive(serde::Serialize, serde::Deserialize)]
struct SlotImage {
    room: RoomImage,
    board: Option<String>,
    /// Shapes changed since the last successful save.
    unsaved: bool,
    /// The room's stored board is not loaded yet (a degraded room): the restored
    /// room keeps loading it, and merges the stored shapes first when it comes.
    degraded: bool,
}

enum Load {
    /// Members wait: their events are held until the load ends or `admit_at`.
    Waiting {
        admit_at: Instant,
        held: VecDeque<Stamped>,
    },
    /// Admitted without the stored shapes; nothing is saved until the load
    /// succeeds, then stored and new shapes are merged.
    Degraded,
    Done,
}

struct RoomSlot {
    room: Room,
    /// Distinguishes this room from an earlier one of the same id, so late store
    /// results of a freed room are ignored.
    instance: u64,
    load: Load,
    load_in_flight: bool,
    load_retry_at: Option<Instant>,
    load_retry: LoadRetry,
    load_failures: u32,
    board: Option<BoardId>,
    save: SaveState,
    /// Every member has left: free the room once nothing is unsaved.
    closing: bool,
    /// Save or load attempts failed since `closing` (see [`MAX_CLOSING_ATTEMPTS`]).
    closing_failures: u32,
    warned_no_board: bool,
    /// `Sync` tokens to answer once the held events are applied.
    pending_syncs: Vec<u64>,
    /// Wall time of the last successful save (for the room monitor).
    last_save_ms: Option<i64>,
    /// When the room's last snapshot was sent (for coalescing).
    last_snapshot_at: Option<Instant>,
    /// Bytes of that snapshot (a big room's snapshots are spaced by size).
    last_snapshot_bytes: usize,
    /// The fallback written at a drain's end, and a hash of the shapes it
    /// holds: a later drain (the worker orphaned after answering) writes none
    /// unless the shapes changed since (members leaving change nothing).
    drain_fallback: Option<(u64, Result<String, String>)>,
}

/// Fallback files written per tick at most (see `tick`).
const MAX_FALLBACKS_PER_TICK: usize = 8;

/// Snapshot deliveries per second a busy room may cause (members × snapshots per
/// second): a room of 100 gets a snapshot at most every 5 ms, and changes in
/// between are folded into it. Sending each member every intermediate state would
/// cost a `send` per member per change and could not be read faster anyway.
/// Kept next to the supervisor's per-member rate (`--max-snapshot-hz`, see
/// `Outbox` in `supervisor/session.rs`): this one saves the worker encoding and
/// sending a big busy room's snapshots, that one bounds what each member gets.
const DELIVERIES_PER_ROOM_PER_SEC: u32 = 20_000;

/// Snapshot bytes per second one room may have encoded and carried over IPC:
/// a room's snapshots are at least their size ÷ this apart. A 4 MB board
/// gets a snapshot every 125 ms (its members see others' changes at 8 Hz; a
/// 12 MB one at under 3 Hz) and takes an eighth of the worker's time at
/// most, so the other rooms of its worker keep their latency. Rooms under
/// 32 KB are not held back by it (under a millisecond).
const SNAPSHOT_BYTES_PER_ROOM_PER_SEC: usize = 32 * 1024 * 1024;

/// What a byte compressed counts for against
/// [`SNAPSHOT_BYTES_PER_ROOM_PER_SEC`], against one copied: zlib-rs at
/// level 2 does 100–200 MB/s, copying and carrying a snapshot a few GB/s. A
/// room whose members make its board's chunks be compressed again (a drag, a
/// text edit, shapes deleted and drawn again) has its snapshots spaced for
/// that work too.
const COMPRESSION_COST: usize = 16;

/// Below this spacing a room is not held back: the worker's timer is not finer,
/// and rooms this small (up to 20 members) are cheap to fan out.
const MIN_SNAPSHOT_SPACING: Duration = Duration::from_millis(1);

impl RoomSlot {
    /// A room with nothing loaded, saved or sent yet.
    fn new(room: Room, instance: u64, load: Load, board: Option<BoardId>) -> RoomSlot {
        RoomSlot {
            room,
            instance,
            load,
            load_in_flight: false,
            load_retry_at: None,
            load_retry: LoadRetry::default(),
            load_failures: 0,
            board,
            save: SaveState::default(),
            closing: false,
            closing_failures: 0,
            warned_no_board: false,
            pending_syncs: Vec::new(),
            last_save_ms: None,
            last_snapshot_at: None,
            last_snapshot_bytes: 0,
            drain_fallback: None,
        }
    }

    /// When the next snapshot of this room may be sent, if it must wait.
    fn snapshot_not_before(&self) -> Option<Instant> {
        let members = self.room.member_count() as u32;
        let by_members = Duration::from_secs(1) * members / DELIVERIES_PER_ROOM_PER_SEC;
        let by_bytes = Duration::from_secs_f64(
            self.last_snapshot_bytes as f64 / SNAPSHOT_BYTES_PER_ROOM_PER_SEC as f64,
        );
        let spacing = by_members.max(by_bytes);
        if spacing < MIN_SNAPSHOT_SPACING {
            return None;
        }
        self.last_snapshot_at.map(|last| last + spacing)
    }
}

struct Drain {
    deadline: Instant,
    saved: u32,
    answered: bool,
}

/// Everything a worker holds, driven from outside: its rooms ([`Room`]s), the
/// loads, saves and snapshots they wait for, and the replies to send. The IPC
/// loop hands it frames ([`handle`](Self::handle)), store results
/// ([`on_result`](Self::on_result)) and the time ([`tick`](Self::tick)), and
/// sends what [`take_output`](Self::take_output) and
/// [`take_stats`](Self::take_stats) return. Loads and saves run as tasks on the
/// store and report back through the channel given to [`new`](Self::new).
/// Instants come from the caller, so tests drive it on a paused clock with a
/// fake store.
pub struct WorkerCore {
    store: Arc<dyn BoardStore>,
    policy: Policy,
    load_wait: Duration,
    /// `--data-dir`, where fallback files go.
    data_dir: PathBuf,
    rooms: HashMap<RoomId, RoomSlot>,
    next_instance: u64,
    results: mpsc::Sender<StoreResult>,
    /// Replies produced since the last `take_output`, in order.
    replies: Vec<FromWorker>,
    /// Rooms whose snapshot changed since the last `take_output`.
    dirty: IndexSet<RoomId>,
    /// Client frames ignored as invalid, since start.
    ignored_frames: u64,
    /// Counts since the last `take_stats`.
    frames_by_type: HashMap<MessageKind, u64>,
    ignored_by_reason: HashMap<IgnoredReason, u64>,
    drain: Option<Drain>,
}

impl WorkerCore {
    /// A worker with no rooms, saving to `store` as `settings` say; store tasks
    /// send their results to `results`, for the loop to pass to
    /// [`on_result`](Self::on_result).
    pub fn new(
        store: Arc<dyn BoardStore>,
        settings: &PersistSettings,
        results: mpsc::Sender<StoreResult>,
    ) -> WorkerCore {
        WorkerCore {
            store,
            policy: Policy {
                debounce: Duration::from_millis(settings.debounce_ms),
                max_wait: Duration::from_millis(settings.max_wait_ms),
            },
            load_wait: Duration::from_millis(settings.load_wait_ms),
            data_dir: settings.data_dir.clone(),
            rooms: HashMap::new(),
            next_instance: 0,
            results,
            replies: Vec::new(),
            dirty: IndexSet::new(),
            ignored_frames: 0,
            frames_by_type: HashMap::new(),
            ignored_by_reason: HashMap::new(),
            drain: None,
        }
    }

    /// Rooms held, loading and closing ones included.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Acts on one frame from the supervisor: opens, restores, closes or
    /// checkpoints a room, applies an event (held while the room's board
    /// loads), answers a `Sync`, starts a drain. Replies wait for
    /// [`take_output`](Self::take_output).
    pub fn handle(&mut self, frame: ToWorker, now: Instant) {
        match frame {
            ToWorker::Hello { .. } | ToWorker::Configure(_) => {
                warn!("unexpected handshake frame after the handshake")
            }
            ToWorker::OpenRoom { room, id_seed } => self.open(room, id_seed, now),
            ToWorker::Event(stamped) => {
                let Some(slot) = self.rooms.get_mut(&stamped.room) else {
                    // Left over in the queue from a worker that failed; dropped.
                    debug!(room = %stamped.room, seq = stamped.seq, "event for a room this worker does not hold");
                    return;
                };
                if let Load::Waiting { held, .. } = &mut slot.load {
                    if held.len() < MAX_HELD_EVENTS {
                        held.push_back(stamped);
                        return;
                    }
                    let room = stamped.room.clone();
                    warn!(%room, "too many events held while loading; admitting members now");
                    self.admit_degraded(&room, now);
                }
                self.apply(stamped, now);
            }
            ToWorker::CloseRoom { room } => {
                if let Some(slot) = self.rooms.get_mut(&room) {
                    slot.closing = true;
                    slot.save.urgent = true;
                } else {
                    self.replies.push(FromWorker::RoomClosed { room });
                }
            }
            ToWorker::Drain { grace_ms } => {
                self.start_drain(now + Duration::from_millis(grace_ms));
            }
            ToWorker::RestoreRoom {
                room,
                id_seed,
                image,
            } => self.restore(room, id_seed, image, now),
            ToWorker::Sync { room, token } => match self.rooms.get_mut(&room) {
                Some(slot) if matches!(slot.load, Load::Waiting { .. }) => {
                    slot.pending_syncs.push(token)
                }
                _ => self.replies.push(FromWorker::Synced { room, token }),
            },
            ToWorker::CheckpointRequest { room } => {
                // A loading room holds events it has not applied: no image yet.
                // A degraded one's image says its board is still to load.
                if self
                    .rooms
                    .get(&room)
                    .is_some_and(|slot| matches!(slot.load, Load::Done | Load::Degraded))
                {
                    self.send_checkpoint(&room);
                }
            }
        }
    }

    fn open(&mut self, room: RoomId, id_seed: u64, now: Instant) {
        if let Some(slot) = self.rooms.get_mut(&room) {
            if slot.closing {
                debug!(%room, "room reopened before it was freed");
                slot.closing = false;
                slot.closing_failures = 0;
                slot.save.urgent = self.drain.is_some();
                self.replies.push(FromWorker::CloseCancelled { room });
            } else {
                warn!(%room, "room opened twice; keeping its state");
            }
            return;
        }
        info!(%room, "room opened");
        self.next_instance += 1;
        let load = Load::Waiting {
            admit_at: now + self.load_wait,
            held: VecDeque::new(),
        };
        let mut slot = RoomSlot::new(
            Room::new(room.clone(), id_seed),
            self.next_instance,
            load,
            None,
        );
        slot.save.urgent = self.drain.is_some();
        start_load(self.store.as_ref(), &self.results, &mut slot);
        self.rooms.insert(room, slot);
    }

    /// Re-creates a room lost with a failed worker, from its checkpoint if it has
    /// one (exact state, no store round trip), else from the store.
    fn restore(&mut self, room: RoomId, id_seed: u64, image: Option<Vec<u8>>, now: Instant) {
        self.rooms.remove(&room);
        let image = image.and_then(|bytes| match postcard::from_bytes::<SlotImage>(&bytes) {
            Ok(image) => Some(image),
            Err(e) => {
                warn!(%room, error = %e, "unreadable checkpoint; restoring from the store");
                None
            }
        });
        let Some(image) = image else {
            self.open(room, id_seed, now);
            return;
        };
        self.next_instance += 1;
        let load = if image.degraded {
            Load::Degraded
        } else {
            Load::Done
        };
        let mut slot = RoomSlot::new(
            Room::from_image(room.clone(), image.room),
            self.next_instance,
            load,
            image.board.map(BoardId),
        );
        if image.unsaved {
            slot.save.changed(now);
        }
        if image.degraded {
            // Its board is still to be loaded: go on trying (the next tick).
            slot.load_retry_at = Some(now);
        }
        slot.save.urgent = self.drain.is_some();
        debug!(%room, seq = slot.room.last_seq(), "room restored from its checkpoint");
        self.rooms.insert(room.clone(), slot);
        self.dirty.insert(room);
    }

    /// The room's checkpoint as it is now (unsaved changes included and flagged).
    fn checkpoint(slot: &RoomSlot) -> Vec<u8> {
        let degraded = matches!(slot.load, Load::Degraded);
        encode_checkpoint(
            slot.room.image(),
            &slot.board,
            slot.save.is_dirty(),
            degraded,
        )
    }

    /// Applies one event to a room that is not waiting for its load.
    fn apply(&mut self, stamped: Stamped, now: Instant) {
        let Some(slot) = self.rooms.get_mut(&stamped.room) else {
            return;
        };
        let conn = match &stamped.event {
            RoomEvent::Join { conn, .. }
            | RoomEvent::Leave { conn }
            | RoomEvent::Message { conn, .. } => *conn,
            // From no connection; its effect (`Unseen`) names none.
            RoomEvent::MemoryBudget { .. } => ConnId(0),
        };
        #[cfg(debug_assertions)]
        poison::check(&stamped);
        let (effect, kind) = slot.room.apply_counted(&stamped);
        if let Some(kind) = kind {
            *self.frames_by_type.entry(kind).or_default() += 1;
        }
        match effect {
            Effect::Joined => {
                self.replies.push(FromWorker::JoinAccepted {
                    room: stamped.room.clone(),
                    conn,
                });
                self.dirty.insert(stamped.room);
            }
            Effect::Rejected(reason) => {
                info!(room = %stamped.room, %conn, ?reason, "join refused");
                self.replies.push(FromWorker::JoinRejected {
                    room: stamped.room,
                    conn,
                    reason,
                });
            }
            Effect::Presence => {
                self.dirty.insert(stamped.room);
            }
            Effect::Shapes => {
                slot.save.changed(now);
                self.dirty.insert(stamped.room);
            }
            Effect::Ignored(Ignored::NotAMember) | Effect::Unseen => {}
            Effect::Ignored(why) => {
                self.ignored_frames += 1;
                *self.ignored_by_reason.entry(why.reason()).or_default() += 1;
                let limit = matches!(
                    why,
                    Ignored::BoardFull | Ignored::ShapeLimit | Ignored::MemoryFull
                );
                if let Some(kind) = kind.filter(|_| limit && slot.room.speaks_v2(conn)) {
                    self.replies.push(FromWorker::Refused {
                        room: stamped.room.clone(),
                        conn,
                        seq: stamped.seq,
                        kind,
                        reason: why.reason(),
                    });
                }
                debug!(room = %stamped.room, %conn, ?why, total = self.ignored_frames, "client frame ignored");
            }
        }
    }

    /// Ends a room's wait for its load: apply the held events to the room as it
    /// is (empty, or merged with the stored shapes if the load just succeeded).
    fn release_held(&mut self, room: &RoomId, next: Load, now: Instant) {
        let Some(slot) = self.rooms.get_mut(room) else {
            return;
        };
        let held = match std::mem::replace(&mut slot.load, next) {
            Load::Waiting { held, .. } => held,
            _ => VecDeque::new(),
        };
        let syncs = std::mem::take(&mut slot.pending_syncs);
        for stamped in held {
            self.apply(stamped, now);
        }
        for token in syncs {
            self.replies.push(FromWorker::Synced {
                room: room.clone(),
                token,
            });
        }
    }

    fn admit_degraded(&mut self, room: &RoomId, now: Instant) {
        self.release_held(room, Load::Degraded, now);
        // A first checkpoint, as for a loaded room: a crash of this worker then
        // restores the room at once (still degraded), not after another wait
        // for a store that is down.
        self.send_checkpoint(room);
    }

    /// Sends the supervisor a checkpoint of `room` as it is now.
    fn send_checkpoint(&mut self, room: &RoomId) {
        if let Some(slot) = self.rooms.get(room) {
            let image = Self::checkpoint(slot);
            let seq = slot.room.last_seq();
            self.replies.push(FromWorker::Checkpoint {
                room: room.clone(),
                seq,
                image,
            });
        }
    }

    /// Takes in a finished load or save: a loaded board is merged and the held
    /// events applied (an unreadable one fails the room); a successful save
    /// marks the room clean and sends its checkpoint; a failure is retried
    /// after a backoff. Results for a room freed since are dropped.
    pub fn on_result(&mut self, result: StoreResult, now: Instant) {
        match result {
            StoreResult::Loaded {
                room,
                instance,
                result,
            } => {
                let Some(slot) = self.rooms.get_mut(&room).filter(|s| s.instance == instance)
                else {
                    return;
                };
                slot.load_in_flight = false;
                match result {
                    Ok(board) => {
                        let count = board.shapes.len();
                        let merged = slot.room.merge_stored(board.shapes);
                        let opaque = merged.opaque;
                        if !merged.cut.is_empty() {
                            keep_cut_shapes(&self.data_dir, &room, merged.cut);
                        }
                        slot.board = board.board;
                        let was_degraded = matches!(slot.load, Load::Degraded);
                        if was_degraded {
                            info!(%room, stored = count, failures = slot.load_failures, "board loaded late; stored shapes merged before the new ones");
                        } else {
                            debug!(%room, shapes = count, "board loaded");
                        }
                        if opaque > 0 {
                            warn!(%room, opaque, "stored shapes not understood; kept verbatim");
                        }
                        self.dirty.insert(room.clone());
                        self.release_held(&room, Load::Done, now);
                        // A first checkpoint, so that from now on a crash of this
                        // worker restores the room without the store.
                        self.send_checkpoint(&room);
                    }
                    Err(e) if e.is_malformed() => self.fail_room(&room, &e),
                    Err(e) => {
                        slot.load_failures += 1;
                        if slot.closing {
                            slot.closing_failures += 1;
                        }
                        let delay = slot.load_retry.after_failure();
                        slot.load_retry_at = Some(now + delay);
                        warn!(%room, error = %e, failures = slot.load_failures, retry_in_ms = delay.as_millis() as u64, "loading the board failed; retrying");
                    }
                }
            }
            StoreResult::Saved {
                room,
                instance,
                seq,
                image,
                retry,
                took,
                result,
            } => {
                let outcome = match &result {
                    Ok(SaveOutcome::Saved { .. }) => SaveResult::Ok,
                    Ok(SaveOutcome::NoBoard) => SaveResult::NoBoard,
                    Err(_) => SaveResult::Failed,
                };
                self.replies.push(FromWorker::SaveFinished {
                    outcome,
                    retry,
                    micros: took.as_micros() as u64,
                });
                let Some(slot) = self.rooms.get_mut(&room).filter(|s| s.instance == instance)
                else {
                    return;
                };
                match result {
                    Ok(SaveOutcome::Saved { board }) => {
                        slot.board = Some(board);
                        slot.save.succeeded();
                        slot.last_save_ms = Some(contract::protocol::unix_time_ms());
                        slot.warned_no_board = false;
                        debug!(%room, seq, shapes = slot.room.shape_count(), "saved");
                        if let Some(drain) = &mut self.drain {
                            drain.saved += 1;
                        }
                        self.replies.push(FromWorker::Saved {
                            room: room.clone(),
                            seq,
                        });
                        self.replies
                            .push(FromWorker::Checkpoint { room, seq, image });
                    }
                    Ok(SaveOutcome::NoBoard) => {
                        slot.save.failed(now);
                        if slot.closing {
                            slot.closing_failures += 1;
                        }
                        if !slot.warned_no_board {
                            slot.warned_no_board = true;
                            warn!(%room, "the backend has no board for this room; keeping its shapes in memory and trying again on later saves");
                        }
                    }
                    Err(e) => {
                        slot.save.failed(now);
                        if slot.closing {
                            slot.closing_failures += 1;
                        }
                        warn!(%room, error = %e, "saving the board failed; will retry");
                    }
                }
            }
        }
    }

    /// Starts what is due at `now`: admissions, load retries, saves; frees closed
    /// rooms that have nothing left to save; answers a finished drain.
    pub fn tick(&mut self, now: Instant) {
        let overdue: Vec<RoomId> = self
            .rooms
            .iter()
            .filter(|(_, slot)| matches!(&slot.load, Load::Waiting { admit_at, .. } if *admit_at <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in overdue {
            let failures = self.rooms[&id].load_failures;
            warn!(room = %id, failures, "board not loaded in time; admitting members to a degraded room (drawing works; nothing is saved until the load succeeds)");
            self.admit_degraded(&id, now);
        }
        let mut freed = Vec::new();
        // Fallback files are written (and synced) on this thread: a few per tick,
        // so many rooms given up at once never keep the worker from answering
        // the supervisor's pings (the rest go at the next tick, within a second).
        let mut fallbacks_left = MAX_FALLBACKS_PER_TICK;
        for (id, slot) in self.rooms.iter_mut() {
            let loaded = matches!(slot.load, Load::Done);
            if !loaded && !slot.load_in_flight && slot.load_retry_at.is_some_and(|at| at <= now) {
                start_load(self.store.as_ref(), &self.results, slot);
            }
            if loaded && slot.save.due_at(&self.policy).is_some_and(|at| at <= now) {
                start_save(self.store.as_ref(), &self.results, slot);
            }
            // A room still waiting for its load may hold events (shapes among
            // them): it is freed only once they have been applied and saved.
            let waiting = matches!(slot.load, Load::Waiting { .. });
            // A store that keeps refusing a room nobody is in: its shapes go to
            // a fallback file (`give_up`), so it does not hold capacity forever.
            let refused =
                slot.closing_failures >= MAX_CLOSING_ATTEMPTS && !waiting && !slot.save.saving();
            let done = !slot.save.is_dirty() && !waiting;
            let given_up = slot.closing && !done && refused && fallbacks_left > 0 && {
                fallbacks_left -= 1;
                give_up(&self.data_dir, id, slot)
            };
            if slot.closing && (done || given_up) {
                freed.push(id.clone());
            }
        }
        for id in freed {
            info!(room = %id, "room closed");
            self.rooms.remove(&id);
            self.dirty.shift_remove(&id);
            self.replies.push(FromWorker::RoomClosed { room: id });
        }
        self.answer_drain(now);
    }

    /// A room whose stored board cannot be parsed: an error for that room, not
    /// an empty board (the next save would overwrite the stored one) and not a
    /// crash. Shapes drawn meanwhile (a degraded room) go to a fallback file;
    /// the room is freed and the supervisor closes its members with 1011.
    fn fail_room(&mut self, room: &RoomId, why: &StoreError) {
        let Some(slot) = self.rooms.remove(room) else {
            return;
        };
        let file = (slot.room.shape_count() > 0)
            .then(|| fallback::write(&self.data_dir, room, "unmerged", &slot.room.shapes_json()));
        match file {
            None => {
                error!(%room, error = %why, "the stored board cannot be read; closing the room (it is left untouched in the store)")
            }
            Some(Ok(file)) => {
                error!(%room, error = %why, file = %file.display(), shapes = slot.room.shape_count(), "the stored board cannot be read; closing the room; shapes drawn meanwhile are in the file")
            }
            Some(Err(e)) => {
                error!(%room, error = %why, fallback_error = %e, shapes = %slot.room.shapes_json(), "the stored board cannot be read; closing the room; the shapes drawn meanwhile could not be written to a file and are logged here")
            }
        }
        for token in slot.pending_syncs {
            self.replies.push(FromWorker::Synced {
                room: room.clone(),
                token,
            });
        }
        self.dirty.shift_remove(room);
        self.replies
            .push(FromWorker::RoomFailed { room: room.clone() });
    }

    /// Saves every room with unsaved changes as soon as possible, and answers
    /// `Drained` when all are saved or at `deadline`.
    pub fn start_drain(&mut self, deadline: Instant) {
        self.drain = Some(Drain {
            deadline,
            saved: 0,
            answered: false,
        });
        for slot in self.rooms.values_mut() {
            slot.save.urgent = true;
        }
    }

    /// Rooms holding changes not saved yet.
    fn unsaved(rooms: &HashMap<RoomId, RoomSlot>) -> Vec<RoomId> {
        rooms
            .iter()
            .filter(|(_, slot)| {
                slot.save.is_dirty()
                    || matches!(&slot.load, Load::Waiting { held, .. } if !held.is_empty())
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// True once a drain has been answered and nothing changed since that is
    /// not saved yet: the worker may exit at once.
    pub fn drained_and_saved(&self) -> bool {
        self.drained() && Self::unsaved(&self.rooms).is_empty()
    }

    fn answer_drain(&mut self, now: Instant) {
        let Some(drain) = &mut self.drain else {
            return;
        };
        if drain.answered {
            return;
        }
        let mut unsaved = Self::unsaved(&self.rooms);
        if unsaved.is_empty() || now >= drain.deadline {
            unsaved.sort();
            drain.answered = true;
            let saved = drain.saved;
            let fallback = unsaved
                .iter()
                .map(|room| self.drain_fallback(room, now))
                .collect();
            self.replies.push(FromWorker::Drained {
                saved,
                unsaved,
                fallback,
            });
        }
    }

    /// A room still unsaved when its drain ends: its shapes go to a fallback
    /// file (held events are applied first, so the file has everything the
    /// room was sent), or, if no file can be written (a read-only or full
    /// disk), into the error log line. Its save may still succeed later.
    fn drain_fallback(&mut self, room: &RoomId, now: Instant) -> Fallback {
        if self
            .rooms
            .get(room)
            .is_some_and(|slot| matches!(slot.load, Load::Waiting { .. }))
        {
            self.release_held(room, Load::Degraded, now);
        }
        let slot = self.rooms.get_mut(room).expect("an unsaved room is held");
        // Built once: hashed, written, and logged if no file can be written.
        let shapes_json = slot.room.shapes_json();
        let shapes_hash = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::hash::DefaultHasher::new();
            shapes_json.hash(&mut hasher);
            hasher.finish()
        };
        if let Some((covered, file)) = &slot.drain_fallback
            && *covered == shapes_hash
        {
            return Fallback {
                room: room.clone(),
                file: file.clone(),
            };
        }
        let (kind, written) = write_fallback(&self.data_dir, room, slot, &shapes_json);
        let shapes = slot.room.shape_count();
        let file = match written {
            Ok(file) => {
                error!(%room, file = %file.display(), shapes, kind, "shutdown: the room could not be saved in time; its shapes are in the file (README, Persistence: how to replay it)");
                Ok(file.display().to_string())
            }
            Err(e) => {
                error!(%room, dir = %self.data_dir.display(), error = %e, shapes, kind, %shapes_json, "shutdown: the room could not be saved in time and no fallback file can be written; its shapes are in this line");
                Err(e.to_string())
            }
        };
        slot.drain_fallback = Some((shapes_hash, file.clone()));
        Fallback {
            room: room.clone(),
            file,
        }
    }

    /// True once a drain has been answered.
    pub fn drained(&self) -> bool {
        self.drain.as_ref().is_some_and(|d| d.answered)
    }

    /// The next instant at which `tick` has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let rooms = self.rooms.values().flat_map(|slot| {
            let admit = match &slot.load {
                Load::Waiting { admit_at, .. } => Some(*admit_at),
                _ => None,
            };
            let retry = if slot.load_in_flight {
                None
            } else {
                slot.load_retry_at
            };
            let save = match slot.load {
                Load::Done => slot.save.due_at(&self.policy),
                _ => None,
            };
            [admit, retry, save]
        });
        let held_snapshots = self
            .dirty
            .iter()
            .filter_map(|id| self.rooms.get(id)?.snapshot_not_before());
        let drain = self
            .drain
            .as_ref()
            .filter(|d| !d.answered)
            .map(|d| d.deadline);
        rooms.chain([drain]).flatten().chain(held_snapshots).min()
    }

    /// Frame counts since the last call, and a summary of every room.
    pub fn take_stats(&mut self) -> Option<FromWorker> {
        if self.frames_by_type.is_empty()
            && self.ignored_by_reason.is_empty()
            && self.rooms.is_empty()
        {
            return None;
        }
        let rooms = self
            .rooms
            .iter()
            .map(|(id, slot)| RoomSummary {
                room: id.clone(),
                members: slot.room.member_count() as u32,
                shapes: slot.room.shape_count() as u32,
                unsaved: slot.save.is_dirty(),
                last_save_ms: slot.last_save_ms,
            })
            .collect();
        Some(FromWorker::Stats {
            frames: self.frames_by_type.drain().collect(),
            ignored: self.ignored_by_reason.drain().collect(),
            rooms,
        })
    }

    /// The replies since the last call, then one snapshot per changed room
    /// (a busy big room's snapshot may be held until its spacing has passed; see
    /// `DELIVERIES_PER_ROOM_PER_SEC`).
    pub fn take_output(&mut self, now: Instant) -> Vec<FromWorker> {
        let mut out = std::mem::take(&mut self.replies);
        let mut held = Vec::new();
        for room_id in self.dirty.drain(..) {
            let Some(slot) = self.rooms.get_mut(&room_id) else {
                continue;
            };
            if matches!(slot.load, Load::Waiting { .. }) {
                continue; // no snapshot before the stored shapes are in
            }
            if slot.snapshot_not_before().is_some_and(|at| now < at) {
                held.push(room_id);
                continue;
            }
            slot.last_snapshot_at = Some(now);
            let snapshot = slot.room.snapshot();
            // Compressing costs about what copying 16 times the bytes does.
            slot.last_snapshot_bytes =
                snapshot.json.len() + COMPRESSION_COST * snapshot.compressed_bytes;
            out.push(FromWorker::Snapshot {
                json: snapshot.json,
                ops: slot.room.take_ops(),
                deflated: snapshot.deflated,
                room: room_id,
            });
        }
        self.dirty.extend(held);
        out
    }
}

/// Writes a closing room's unsaved shapes to a fallback file once the store has
/// refused them [`MAX_CLOSING_ATTEMPTS`] times; true if written (the room may
/// then be freed). If the file cannot be written either, the room is kept and
/// its saves retried: nothing is dropped.
fn give_up(data_dir: &Path, room: &RoomId, slot: &mut RoomSlot) -> bool {
    let attempts = slot.closing_failures;
    match write_fallback(data_dir, room, slot, &slot.room.shapes_json()) {
        (kind, Ok(file)) => {
            error!(%room, file = %file.display(), shapes = slot.room.shape_count(), attempts, kind, "the store keeps refusing this room and everyone has left: its unsaved shapes are in the file (README, Persistence: how to replay it); room freed");
            slot.save = SaveState::default();
            true
        }
        (_, Err(e)) => {
            error!(%room, dir = %data_dir.display(), error = %e, attempts, "the store keeps refusing this room and its fallback file cannot be written: keeping the room, retrying its saves");
            slot.closing_failures = 0;
            false
        }
    }
}

/// Writes a room's shapes (`shapes_json`, the room's as it is) to a new
/// fallback file; returns what the file holds (`unsaved`: the whole board;
/// `unmerged`: only the shapes drawn while the stored board was not loaded)
/// and the file.
fn write_fallback(
    data_dir: &Path,
    room: &RoomId,
    slot: &RoomSlot,
    shapes_json: &str,
) -> (&'static str, std::io::Result<PathBuf>) {
    let kind = if matches!(slot.load, Load::Done) {
        "unsaved"
    } else {
        "unmerged"
    };
    (kind, fallback::write(data_dir, room, kind, shapes_json))
}

/// Keeps the shapes a loaded board had over the room's budgets in a fallback
/// file, and says so at warn with their ids (all in the file, the first ones in
/// the log; every id in the log if the file cannot be written).
fn keep_cut_shapes(data_dir: &Path, room: &RoomId, cut: Vec<(String, String)>) {
    let ids: Vec<&str> = cut.iter().map(|(id, _)| id.as_str()).collect();
    let mut shapes = String::from("[");
    for (i, (_, json)) in cut.iter().enumerate() {
        if i > 0 {
            shapes.push(',');
        }
        shapes.push_str(json);
    }
    shapes.push(']');
    match fallback::write(data_dir, room, "trimmed", &shapes) {
        Ok(file) => warn!(
            %room,
            cut = cut.len(),
            file = %file.display(),
            first_ids = ?&ids[..ids.len().min(MAX_LOGGED_IDS)],
            "stored board over the room's limits ({} shapes, {} MiB of shapes' JSON): cut shapes are in the file; the room is trimmed",
            contract::protocol::MAX_SHAPES_PER_ROOM,
            contract::protocol::MAX_BOARD_BYTES >> 20,
        ),
        Err(e) => {
            error!(%room, cut = cut.len(), ids = ?ids, error = %e, "stored board over the room's limits: cut shapes could not be written to a file")
        }
    }
}

/// Starts loading a room's board in a task; the result comes back on `results`.
fn start_load(store: &dyn BoardStore, results: &mpsc::Sender<StoreResult>, slot: &mut RoomSlot) {
    slot.load_in_flight = true;
    slot.load_retry_at = None;
    let room = slot.room.id().clone();
    let instance = slot.instance;
    let load = store.load(room.clone());
    let results = results.clone();
    tokio::spawn(async move {
        let result = load.await;
        let _ = results
            .send(StoreResult::Loaded {
                room,
                instance,
                result,
            })
            .await;
    });
}

/// Starts saving a room in a task; the result (with the checkpoint of what was
/// written) comes back on `results`.
fn start_save(store: &dyn BoardStore, results: &mpsc::Sender<StoreResult>, slot: &mut RoomSlot) {
    let retry = slot.save.retrying();
    slot.save.begin();
    let room_image = slot.room.image();
    let shapes_json = room_image.shapes_json.clone();
    // The room as written: once the save succeeds, nothing in it is unsaved.
    // Only a loaded room is saved, so the image is never degraded.
    let image = encode_checkpoint(room_image, &slot.board, false, false);
    let room = slot.room.id().clone();
    let instance = slot.instance;
    let seq = slot.room.last_seq();
    let save = store.save(room.clone(), slot.board.clone(), shapes_json);
    let results = results.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let result = save.await;
        let _ = results
            .send(StoreResult::Saved {
                room,
                instance,
                seq,
                image,
                retry,
                took: started.elapsed(),
                result,
            })
            .await;
    });
}

/// The room a checkpoint holds, and whether its stored board was still to be
/// loaded (a degraded room); `None` for bytes that are not a checkpoint.
pub(crate) fn room_from_checkpoint(id: RoomId, bytes: &[u8]) -> Option<(Room, bool)> {
    let image = postcard::from_bytes::<SlotImage>(bytes).ok()?;
    Some((Room::from_image(id, image.room), image.degraded))
}

/// A checkpoint: the room image and what persisting it needs, encoded.
fn encode_checkpoint(
    room: RoomImage,
    board: &Option<BoardId>,
    unsaved: bool,
    degraded: bool,
) -> Vec<u8> {
    let image = SlotImage {
        room,
        board: board.as_ref().map(|b| b.0.clone()),
        unsaved,
        degraded,
    };
    postcard::to_stdvec(&image).expect("serialising to memory cannot fail")
}

/// Test builds only: a frame whose text contains [`poison::MARKER`] aborts the
/// worker when `SESSION_SERVER_TEST_POISON=1`, to test crash isolation. Release
/// builds do not contain this code.
#[cfg(debug_assertions)]
pub(crate) mod poison {
    use contract::ipc::{RoomEvent, Stamped};

    pub const MARKER: &str = "__poison_test_frame__";

    pub fn check(stamped: &Stamped) {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let enabled = *ENABLED
            .get_or_init(|| std::env::var("SESSION_SERVER_TEST_POISON").as_deref() == Ok("1"));
        if let RoomEvent::Message { text, .. } = &stamped.event
            && enabled
            && text.contains(MARKER)
        {
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contract::config::StoreConfig;
    use contract::ipc::ConnId;
    use futures_util::FutureExt;
    use futures_util::future::BoxFuture;
    use serde_json::{Value, json};
    use std::sync::Mutex;

    /// A store in memory: loads can be made to fail, saves take `save_delay`.
    #[derive(Default)]
    struct FakeState {
        stored: HashMap<RoomId, Vec<Value>>,
        failing_loads: bool,
        /// Every save is refused (409), as by a backend that keeps saying no.
        failing_saves: bool,
        save_delay: Duration,
        saves: Vec<(Instant, RoomId, Value)>,
    }

    #[derive(Clone, Default)]
    struct FakeStore(Arc<Mutex<FakeState>>);

    impl BoardStore for FakeStore {
        fn load(&self, room: RoomId) -> BoxFuture<'static, Result<LoadedBoard, StoreError>> {
            let state = self.0.clone();
            async move {
                let state = state.lock().unwrap();
                if state.failing_loads {
                    return Err(StoreError::Status {
                        status: 500,
                        what: "the board lookup",
                    });
                }
                Ok(LoadedBoard {
                    board: Some(BoardId(room.0.clone())),
                    shapes: state.stored.get(&room).cloned().unwrap_or_default(),
                })
            }
            .boxed()
        }

        fn save(
            &self,
            room: RoomId,
            _board: Option<BoardId>,
            shapes_json: String,
        ) -> BoxFuture<'static, Result<SaveOutcome, StoreError>> {
            let state = self.0.clone();
            async move {
                let (delay, failing) = {
                    let state = state.lock().unwrap();
                    (state.save_delay, state.failing_saves)
                };
                tokio::time::sleep(delay).await;
                if failing {
                    return Err(StoreError::Status {
                        status: 409,
                        what: "the board save",
                    });
                }
                let shapes: Value = serde_json::from_str(&shapes_json).unwrap();
                let mut state = state.lock().unwrap();
                state
                    .saves
                    .push((Instant::now(), room.clone(), shapes.clone()));
                state
                    .stored
                    .insert(room.clone(), shapes.as_array().unwrap().clone());
                Ok(SaveOutcome::Saved {
                    board: BoardId(room.0),
                })
            }
            .boxed()
        }
    }

    struct Harness {
        core: WorkerCore,
        results: mpsc::Receiver<StoreResult>,
        store: FakeStore,
        seq: u64,
        output: Vec<FromWorker>,
    }

    const ROOM: &str = "r";

    fn room() -> RoomId {
        RoomId(ROOM.into())
    }

    impl Harness {
        fn new(store: FakeStore) -> Harness {
            let settings = PersistSettings {
                store: StoreConfig::Embedded {
                    path: "/unused".into(),
                },
                debounce_ms: 2000,
                max_wait_ms: 10_000,
                load_wait_ms: 5000,
                data_dir: std::env::temp_dir().join("ss-core-tests"),
                store_identity: None,
            };
            let (tx, results) = mpsc::channel(16);
            Harness {
                core: WorkerCore::new(Arc::new(store.clone()), &settings, tx),
                results,
                store,
                seq: 0,
                output: Vec::new(),
            }
        }

        fn frame(&mut self, frame: ToWorker) {
            self.core.handle(frame, Instant::now());
            self.core.tick(Instant::now());
            self.output.extend(self.core.take_output(Instant::now()));
        }

        fn event(&mut self, event: RoomEvent) {
            self.seq += 1;
            let stamped = Stamped {
                room: room(),
                seq: self.seq,
                time_ms: 1_704_110_400_000 + self.seq as i64,
                event,
            };
            self.frame(ToWorker::Event(stamped));
        }

        fn create(&mut self, x: i64) {
            self.event(RoomEvent::Message {
                conn: ConnId(1),
                text: json!({"type":"shape_create","shapeType":"oval","x":x,"y":0,"width":1,"height":1})
                    .to_string().into(),
            });
        }

        /// Opens the room, joins user "a" on connection 1 and lets the load
        /// finish; returns the time it started.
        async fn open_and_join(&mut self) -> Instant {
            let t0 = Instant::now();
            self.open_room_and_join();
            self.run_until(t0 + Duration::from_millis(1)).await;
            t0
        }

        /// Opens the room and joins user "a" on connection 1 (the load starts).
        fn open_room_and_join(&mut self) {
            self.frame(ToWorker::OpenRoom {
                room: room(),
                id_seed: 1,
            });
            self.event(RoomEvent::Join {
                conn: ConnId(1),
                user_id: "a".into(),
                v2: false,
                deflate: false,
            });
        }

        /// A loaded room with `members` members, its output so far cleared.
        async fn with_members(members: u64) -> Harness {
            let mut h = Harness::new(FakeStore::default());
            let t0 = h.open_and_join().await;
            for conn in 2..=members {
                h.event(RoomEvent::Join {
                    conn: ConnId(conn),
                    user_id: format!("u{conn}"),
                    v2: false,
                    deflate: false,
                });
            }
            h.run_until(t0 + Duration::from_millis(10)).await;
            h.output.clear();
            h
        }

        /// Runs the loop (store results, timers) until `until`.
        async fn run_until(&mut self, until: Instant) {
            loop {
                let deadline = self.core.next_deadline().map_or(until, |d| d.min(until));
                tokio::select! {
                    Some(result) = self.results.recv() => self.core.on_result(result, Instant::now()),
                    _ = tokio::time::sleep_until(deadline) => {}
                }
                self.core.tick(Instant::now());
                self.output.extend(self.core.take_output(Instant::now()));
                if Instant::now() >= until {
                    return;
                }
            }
        }

        fn snapshots(&self) -> Vec<Value> {
            self.output
                .iter()
                .filter_map(|m| match m {
                    FromWorker::Snapshot { json, .. } => Some(serde_json::from_str(json).unwrap()),
                    _ => None,
                })
                .collect()
        }

        fn saves(&self) -> Vec<(Instant, Value)> {
            let state = self.store.0.lock().unwrap();
            state
                .saves
                .iter()
                .map(|(t, _, s)| (*t, s.clone()))
                .collect()
        }
    }

    impl Harness {
        /// A harness on `store` whose fallback files go to a folder of its
        /// own (returned, for the test to read and remove).
        fn in_fresh_data_dir(store: FakeStore) -> (Harness, std::path::PathBuf) {
            let mut h = Harness::new(store);
            let dir = std::env::temp_dir().join(format!("ss-core-{}", rand::random::<u64>()));
            h.core.data_dir = dir.clone();
            (h, dir)
        }
    }

    impl FakeStore {
        /// A store whose loads fail (until the test says otherwise) and that
        /// holds one oval at x = 7 for the room.
        fn failing_loads_of_one_stored_oval_at_7() -> FakeStore {
            let store = FakeStore::default();
            let mut state = store.0.lock().unwrap();
            state.failing_loads = true;
            let old = json!({"id":"old","type":"oval","x":7,"y":0,"width":1,"height":1,"userId":"u",
                "timestamp":"2024-01-01T12:00:00.000Z","fill":"#000","stroke":"#fff","rotation":0});
            state.stored.insert(room(), vec![old]);
            drop(state);
            store
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_closing_room_the_store_keeps_refusing_is_freed_into_a_fallback_file() {
        let store = FakeStore::default();
        store.0.lock().unwrap().failing_saves = true;
        let (mut h, dir) = Harness::in_fresh_data_dir(store);
        let t0 = h.open_and_join().await;
        h.create(1);
        h.create(2);
        let shapes = h.core.rooms[&room()].room.shapes_json();
        h.event(RoomEvent::Leave { conn: ConnId(1) });
        h.frame(ToWorker::CloseRoom { room: room() });
        let closed = |h: &Harness| {
            h.output
                .iter()
                .any(|m| matches!(m, FromWorker::RoomClosed { .. }))
        };
        // Refused at 0, 0.5, 1.5 and 3.5 s: still held, nothing written yet.
        h.run_until(t0 + Duration::from_secs(7)).await;
        assert!(!closed(&h));
        assert!(!dir.exists());
        // The fifth refusal (7.5 s): the shapes go to a file and the room is freed.
        h.run_until(t0 + Duration::from_secs(9)).await;
        assert!(closed(&h));
        assert_eq!(h.core.room_count(), 0);
        let files: Vec<_> = std::fs::read_dir(dir.join(fallback::FALLBACK_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1);
        assert!(files[0].to_string_lossy().ends_with("-unsaved.json"));
        let body: Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
        let shapes: Value = serde_json::from_str(&shapes).unwrap();
        assert_eq!(body, json!({"data":{"shapes":shapes,"cursors":[]}}));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn xs(shapes: &Value) -> Vec<i64> {
        shapes
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["x"].as_i64().unwrap())
            .collect()
    }

    /// A room of 40 members gets a snapshot at most every 2 ms (20,000 deliveries
    /// per second): a change within that time is held, folded with the next one,
    /// and sent when the spacing has passed; a small room is never held.
    #[tokio::test(start_paused = true)]
    async fn a_busy_big_room_folds_changes_into_spaced_snapshots() {
        let mut h = Harness::with_members(40).await;
        let t1 = Instant::now();
        h.create(1); // sent at once: the last snapshot is older than 2 ms
        h.create(2); // held
        h.create(3); // folded into the held one
        assert_eq!(h.snapshots().len(), 1);
        assert_eq!(xs(&h.snapshots()[0]["shapes"]), vec![1]);
        assert_eq!(h.core.next_deadline(), Some(t1 + Duration::from_millis(2)));
        h.run_until(t1 + Duration::from_millis(2)).await;
        let snaps = h.snapshots();
        assert_eq!(snaps.len(), 2);
        assert_eq!(xs(&snaps[1]["shapes"]), vec![1, 2, 3]);

        // With 19 members (spacing under 1 ms, the timer's grain) nothing is held.
        let mut small = Harness::with_members(19).await;
        small.create(1);
        small.create(2);
        assert_eq!(small.snapshots().len(), 2);
    }

    /// A 4 MB board's snapshots are at least 4 MB ÷ 32 MiB/s (125 ms) apart,
    /// however few its members: cursor moves in between are folded.
    #[tokio::test(start_paused = true)]
    async fn a_big_board_s_snapshots_are_spaced_by_their_size() {
        let mut h = Harness::with_members(1).await;
        let text = "板".repeat(20_000); // 60 KB
        for x in 0..70 {
            h.event(RoomEvent::Message {
                conn: ConnId(1),
                text: json!({"type":"shape_create","shapeType":"text","x":x,"y":0,"width":1,"height":1,"text":text}).to_string().into(),
            });
            h.run_until(Instant::now() + Duration::from_millis(200))
                .await;
        }
        assert_eq!(
            h.snapshots().len(),
            70,
            "each create 200 ms apart: all sent"
        );
        let bytes = h.core.rooms[&room()].last_snapshot_bytes;
        assert!(bytes > 4_000_000, "{bytes}");
        h.output.clear();
        let t1 = Instant::now();
        for x in 0..30 {
            h.event(RoomEvent::Message {
                conn: ConnId(1),
                text: json!({"type":"cursor_move","x":x,"y":0}).to_string().into(),
            });
            h.run_until(t1 + Duration::from_millis(7 * (x + 1))).await;
        }
        // 210 ms of moves at 144 Hz: the first at once, then one 125 ms later.
        let spacing = Duration::from_secs_f64(bytes as f64 / (32.0 * 1024.0 * 1024.0));
        assert!(spacing > Duration::from_millis(120), "{spacing:?}");
        assert_eq!(h.snapshots().len(), 2);
        h.run_until(t1 + spacing * 2).await;
        let snaps = h.snapshots();
        assert_eq!(snaps.len(), 3);
        assert_eq!(
            snaps[2]["cursors"][0]["x"], 29,
            "the last move is never lost"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_join_waits_for_the_load_and_sees_the_stored_shapes() {
        let store = FakeStore::default();
        let stored = json!({"id":"old","type":"oval","x":7,"y":0,"width":1,"height":1,"userId":"u",
            "timestamp":"2024-01-01T12:00:00.000Z","fill":"#000","stroke":"#fff","rotation":0});
        store
            .0
            .lock()
            .unwrap()
            .stored
            .insert(room(), vec![stored.clone()]);
        let mut h = Harness::new(store);
        h.open_room_and_join();
        assert!(h.output.is_empty(), "nothing before the load");
        h.run_until(Instant::now() + Duration::from_millis(10))
            .await;
        assert!(matches!(h.output[0], FromWorker::JoinAccepted { .. }));
        let snaps = h.snapshots();
        assert_eq!(snaps.len(), 1);
        assert_eq!(snaps[0]["shapes"], json!([stored]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_during_a_save_is_written_by_the_next_save() {
        let store = FakeStore::default();
        store.0.lock().unwrap().save_delay = Duration::from_secs(1);
        let mut h = Harness::new(store);
        let t0 = h.open_and_join().await;
        h.create(1);
        // The save starts at 2 s and takes 1 s; a change lands in the middle.
        h.run_until(t0 + Duration::from_millis(2500)).await;
        h.create(2);
        h.run_until(t0 + Duration::from_secs(20)).await;
        let saves = h.saves();
        assert_eq!(saves.len(), 2);
        assert_eq!(xs(&saves[0].1), [1]);
        assert_eq!(saves[0].0 - t0, Duration::from_millis(3001));
        assert_eq!(xs(&saves[1].1), [1, 2]);
        // Second save: debounce from the change at 2.5 s, started once the first ended.
        assert_eq!(saves[1].0 - t0, Duration::from_millis(5500));
        let reported: Vec<u64> = h
            .output
            .iter()
            .filter_map(|m| match m {
                FromWorker::Saved { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(reported, [2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closing_room_saves_then_is_freed_and_can_be_reopened_before() {
        let mut h = Harness::new(FakeStore::default());
        let t0 = h.open_and_join().await;
        h.create(1);
        h.event(RoomEvent::Leave { conn: ConnId(1) });
        h.frame(ToWorker::CloseRoom { room: room() });
        // Reopened before the save ended: the close is cancelled, state kept.
        h.frame(ToWorker::OpenRoom {
            room: room(),
            id_seed: 2,
        });
        assert!(
            h.output
                .iter()
                .any(|m| matches!(m, FromWorker::CloseCancelled { .. }))
        );
        h.frame(ToWorker::CloseRoom { room: room() });
        h.run_until(t0 + Duration::from_millis(50)).await;
        assert_eq!(h.saves().len(), 1, "saved at once, not after the debounce");
        assert_eq!(xs(&h.saves()[0].1), [1]);
        assert!(matches!(
            h.output.last(),
            Some(FromWorker::RoomClosed { .. })
        ));
        assert_eq!(h.core.room_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_load_admits_members_degraded_then_merges_stored_first() {
        let store = FakeStore::failing_loads_of_one_stored_oval_at_7();
        let mut h = Harness::new(store.clone());
        let t0 = Instant::now();
        h.open_room_and_join();
        h.run_until(t0 + Duration::from_millis(4900)).await;
        assert!(h.output.is_empty(), "still waiting");
        h.run_until(t0 + Duration::from_millis(5000)).await;
        assert_eq!(h.snapshots().len(), 1, "admitted at the bound");
        assert_eq!(h.snapshots()[0]["shapes"], json!([]));
        h.create(1);
        h.run_until(t0 + Duration::from_secs(30)).await;
        assert!(h.saves().is_empty(), "nothing saved while the load fails");
        store.0.lock().unwrap().failing_loads = false;
        h.run_until(t0 + Duration::from_secs(40)).await;
        let last = h.snapshots().pop().unwrap();
        assert_eq!(xs(&last["shapes"]), [7, 1]);
        assert_eq!(xs(&h.saves().last().unwrap().1), [7, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_saves_everything_at_once_and_answers() {
        let mut h = Harness::new(FakeStore::default());
        let t0 = h.open_and_join().await;
        h.create(1);
        h.frame(ToWorker::Drain { grace_ms: 1000 });
        h.run_until(t0 + Duration::from_millis(20)).await;
        assert_eq!(h.saves().len(), 1);
        assert!(h.output.iter().any(|m| matches!(
            m,
            FromWorker::Drained { saved: 1, unsaved, fallback } if unsaved.is_empty() && fallback.is_empty()
        )));
    }

    /// A drain whose save the store has not answered by its deadline writes
    /// the room's shapes to a fallback file and names it in the answer; a second
    /// drain (the worker orphaned after answering) with nothing changed since
    /// names the same file and writes no other.
    #[tokio::test(start_paused = true)]
    async fn a_drain_that_ends_before_its_save_puts_the_room_in_a_fallback_file() {
        let store = FakeStore::default();
        store.0.lock().unwrap().save_delay = Duration::from_secs(3600);
        let (mut h, dir) = Harness::in_fresh_data_dir(store);
        let t0 = h.open_and_join().await;
        h.create(1);
        h.create(2);
        let shapes: Value =
            serde_json::from_str(&h.core.rooms[&room()].room.shapes_json()).unwrap();
        h.frame(ToWorker::Drain { grace_ms: 1000 });
        h.run_until(t0 + Duration::from_millis(500)).await;
        assert!(!dir.exists(), "nothing written before the deadline");
        h.run_until(t0 + Duration::from_millis(1100)).await;
        let answers: Vec<&Vec<Fallback>> = h
            .output
            .iter()
            .filter_map(|m| match m {
                FromWorker::Drained {
                    unsaved, fallback, ..
                } if *unsaved == [room()] => Some(fallback),
                _ => None,
            })
            .collect();
        assert_eq!(answers.len(), 1, "{:?}", h.output);
        let file = answers[0][0].file.clone().unwrap();
        assert_eq!(answers[0][0].room, room());
        assert!(file.ends_with("-unsaved.json"), "{file}");
        let body: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(body, json!({"data":{"shapes":shapes,"cursors":[]}}));

        h.output.clear();
        h.core
            .start_drain(Instant::now() + Duration::from_millis(500));
        h.run_until(t0 + Duration::from_millis(1700)).await;
        assert!(h.output.iter().any(|m| matches!(
            m,
            FromWorker::Drained { fallback, .. } if fallback[0].file.as_deref() == Ok(file.as_str())
        )));
        let files = std::fs::read_dir(dir.join(fallback::FALLBACK_DIR))
            .unwrap()
            .count();
        assert_eq!(files, 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A degraded room (its board did not load) is checkpointed like a loaded
    /// one; restored from that image on a fresh worker it is still degraded: it
    /// saves nothing, keeps loading, and merges the stored shapes first when the
    /// store is back.
    #[tokio::test(start_paused = true)]
    async fn a_degraded_room_s_checkpoint_restores_it_degraded_and_it_still_merges() {
        let store = FakeStore::failing_loads_of_one_stored_oval_at_7();
        let mut h = Harness::new(store.clone());
        let t0 = Instant::now();
        h.open_room_and_join();
        h.run_until(t0 + Duration::from_millis(5000)).await;
        h.create(1);
        h.frame(ToWorker::CheckpointRequest { room: room() });
        let checkpoints: Vec<(u64, Vec<u8>)> = h
            .output
            .iter()
            .filter_map(|m| match m {
                FromWorker::Checkpoint { image, seq, .. } => Some((*seq, image.clone())),
                _ => None,
            })
            .collect();
        // One when admitted degraded (after the join), one for the request.
        let seqs: Vec<u64> = checkpoints.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, [1, 2]);
        let image = checkpoints.last().unwrap().clone();

        // The worker died; a fresh one restores the room from the image.
        let mut fresh = Harness::new(store.clone());
        fresh.seq = h.seq;
        fresh.frame(ToWorker::RestoreRoom {
            room: room(),
            id_seed: 1,
            image: Some(image.1),
        });
        fresh.create(2);
        fresh.run_until(t0 + Duration::from_secs(30)).await;
        assert_eq!(xs(&fresh.snapshots().pop().unwrap()["shapes"]), [1, 2]);
        assert!(fresh.saves().is_empty(), "still degraded: nothing saved");
        store.0.lock().unwrap().failing_loads = false;
        fresh.run_until(t0 + Duration::from_secs(40)).await;
        assert_eq!(xs(&fresh.snapshots().pop().unwrap()["shapes"]), [7, 1, 2]);
        assert_eq!(xs(&fresh.saves().last().unwrap().1), [7, 1, 2]);
    }
}
