//! A worker slot's two queues: the **inbox** of the slot's rooms (sessions →
//! the slot's task, which owns the rooms) and the **frame queue** (that task →
//! the writer of the worker's socket). Both are unbounded channels, so the
//! slot's task never waits on a send: reading the worker's replies never waits
//! on writing to it. What bounds them is the bytes of the client messages they
//! hold: a session takes a message's share of [`MESSAGE_KIB`] (a [`Charge`],
//! waiting while it is spent: backpressure on that client only, nothing
//! dropped) before the message enters the inbox, and the share is given back
//! when the writer takes the frame (a message journaled while its room waits
//! for a restore keeps it until the restore sends it: `Recovery::held`). A
//! count alone let 8,192 messages of 64 KiB (512 MiB) wait for one worker,
//! and with permessage-deflate a client uploads such a message in a few
//! hundred bytes. Every other frame is bounded by what
//! causes it (a connection's join and leave, a room's open and close, a
//! journal's restore).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, mpsc};

use contract::ipc::ToWorker;

/// KiB of client messages queued per worker before senders wait: 8 MiB,
/// about a quarter of a second of a worker's work at its fastest
/// (`BENCHMARKS.md`). At most half a room's journal bound
/// (`journal::JOURNAL_MAX_BYTES`, 16 MiB): a room's checkpoint request waits
/// behind what is queued, so one busy room whose queued messages could reach
/// that bound would drop its journal over and over, and a worker crash would
/// then close it (1011) instead of restoring it.
pub const MESSAGE_KIB: u32 = 8 * 1024;

/// KiB a client message of `len` bytes takes of [`MESSAGE_KIB`] (at least one).
fn kib(len: usize) -> u32 {
    len.div_ceil(1024).max(1) as u32
}

/// A client message's share of its worker's [`MESSAGE_KIB`], held until the
/// writer takes its frame (or it is dropped unsent).
#[derive(Debug)]
pub struct Charge(#[allow(dead_code)] OwnedSemaphorePermit); // held only to be dropped

/// The bytes budget of one worker's client messages, shared by its room
/// handles (which charge it) and its frame queue (which gives it back).
#[derive(Clone, Debug)]
pub struct MessageBudget(Arc<Semaphore>);

impl Default for MessageBudget {
    fn default() -> Self {
        MessageBudget(Arc::new(Semaphore::new(MESSAGE_KIB as usize)))
    }
}

impl MessageBudget {
    /// Waits until the budget has room for a client message of `len` bytes.
    /// Fails only if the budget is closed (it never is).
    pub async fn charge(&self, len: usize) -> Result<Charge, AcquireError> {
        self.0
            .clone()
            .acquire_many_owned(kib(len))
            .await
            .map(Charge)
    }

    /// KiB free now (for tests).
    #[cfg(test)]
    pub fn available_kib(&self) -> usize {
        self.0.available_permits()
    }
}

/// What a queued frame carries besides itself.
#[derive(Debug, Default)]
pub enum Ticket {
    /// Nothing.
    #[default]
    None,
    /// A client message's share of the bytes budget, given back when the
    /// writer takes the frame (held only to be dropped then).
    Charge(#[allow(dead_code)] Charge),
    /// A restore's first frame: set when the writer takes it, so a crash is
    /// blamed only on restores the worker had started reading.
    Taken(Arc<AtomicBool>),
}

/// One frame for the worker, with its [`Ticket`].
#[derive(Debug)]
pub struct Outgoing {
    /// The frame.
    pub frame: ToWorker,
    /// What the writer gives back or marks when it takes the frame.
    pub ticket: Ticket,
}

/// A new frame queue: its sending and receiving ends.
pub fn channel() -> (WorkerQueue, WorkerFrames) {
    let (frames, receiver) = mpsc::unbounded_channel();
    let depth = Arc::new(AtomicUsize::new(0));
    (
        WorkerQueue {
            frames,
            depth: depth.clone(),
        },
        WorkerFrames {
            frames: receiver,
            depth,
        },
    )
}

/// The sending end of a worker's frame queue.
#[derive(Clone, Debug)]
pub struct WorkerQueue {
    frames: mpsc::UnboundedSender<Outgoing>,
    /// Frames queued and not yet taken (`/metrics`).
    depth: Arc<AtomicUsize>,
}

impl WorkerQueue {
    /// Frames queued and not yet taken by the writer.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Queues `frame` (never waits). False if the queue is gone (the server
    /// is stopping).
    pub fn send(&self, frame: ToWorker) -> bool {
        self.send_with(frame, Ticket::None)
    }

    /// Queues `frame` with its ticket.
    pub fn send_with(&self, frame: ToWorker, ticket: Ticket) -> bool {
        let sent = self.frames.send(Outgoing { frame, ticket }).is_ok();
        if sent {
            self.depth.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }
}

/// The receiving end: each frame taken gives its ticket back.
pub struct WorkerFrames {
    frames: mpsc::UnboundedReceiver<Outgoing>,
    depth: Arc<AtomicUsize>,
}

impl WorkerFrames {
    /// The next frame (`None` once every sender is gone).
    pub async fn recv(&mut self) -> Option<ToWorker> {
        let next = self.frames.recv().await?;
        Some(self.taken(next))
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Result<ToWorker, TryRecvError> {
        let next = self.frames.try_recv()?;
        Ok(self.taken(next))
    }

    /// A frame leaves the queue: its charge is given back, its restore marked.
    fn taken(&self, outgoing: Outgoing) -> ToWorker {
        self.depth.fetch_sub(1, Ordering::Relaxed);
        if let Ticket::Taken(flag) = &outgoing.ticket {
            flag.store(true, Ordering::Relaxed);
        }
        outgoing.frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contract::ipc::RoomId;
    use std::time::Duration;

    /// 8 MiB of 64 KiB messages fill the budget; the next waits until one
    /// leaves the queue, and a charge that is not sent is given back.
    #[tokio::test]
    async fn client_messages_wait_for_bytes_and_give_them_back_when_taken() {
        let budget = MessageBudget::default();
        let (queue, mut frames) = channel();
        let per = 64 * 1024;
        let fit = (MESSAGE_KIB / 64) as usize;
        let close = || ToWorker::CloseRoom {
            room: RoomId("r".into()),
        };
        for _ in 0..fit {
            let charge = budget.charge(per).await.unwrap();
            assert!(queue.send_with(close(), Ticket::Charge(charge)));
        }
        let next = tokio::time::timeout(Duration::from_millis(50), budget.charge(per));
        assert!(next.await.is_err(), "the 129th 64 KiB message waits");
        // A frame without a client message is not held by the bytes.
        assert!(queue.send(close()));
        // One leaves: one more fits.
        frames.recv().await.unwrap();
        let charge = budget.charge(per).await.unwrap();
        // A charge dropped unsent is given back.
        drop(charge);
        let _kept = budget.charge(per).await.unwrap();
        assert_eq!(budget.available_kib(), 0);
        // A restore's first frame is marked when taken.
        while frames.try_recv().is_ok() {}
        let flag = Arc::new(AtomicBool::new(false));
        queue.send_with(close(), Ticket::Taken(flag.clone()));
        assert!(!flag.load(Ordering::Relaxed));
        frames.try_recv().unwrap();
        assert!(flag.load(Ordering::Relaxed));
    }
}
