//! A worker's frame queue, bounded twice: by frames (the channel's capacity)
//! and by the bytes of the client messages it holds. The count alone let
//! 8,192 messages of 64 KiB (512 MiB) wait for one worker, and with
//! permessage-deflate a client uploads such a message in a few hundred
//! bytes; the bytes bound keeps what waits for a worker under
//! [`MESSAGE_KIB`], whatever the clients send. A session over it waits, as
//! it does for a full queue: backpressure on its client, nothing dropped.
//!
//! A message's bytes are taken when it is queued (a [`Charge`], kept only
//! once the frame is sent) and given back when the frame leaves the queue.

use std::ops::Deref;
use std::sync::Arc;

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{AcquireError, Semaphore, SemaphorePermit, mpsc};

use contract::ipc::{RoomEvent, Stamped, ToWorker};

/// Frames queued per worker before senders wait. Large enough to absorb bursts
/// from many rooms; when full, each session waits (backpressure on its client).
pub const FRAMES: usize = 8192;

/// KiB of client messages queued per worker before senders wait: 32 MiB,
/// about a second of a worker's work at its fastest (`BENCHMARKS.md`).
pub const MESSAGE_KIB: u32 = 32 * 1024;

/// A new queue: its sending and receiving ends.
pub fn channel() -> (WorkerQueue, WorkerFrames) {
    let (frames, receiver) = mpsc::channel(FRAMES);
    let message_kib = Arc::new(Semaphore::new(MESSAGE_KIB as usize));
    (
        WorkerQueue {
            frames,
            message_kib: message_kib.clone(),
        },
        WorkerFrames {
            frames: receiver,
            message_kib,
        },
    )
}

/// KiB a client message of `len` bytes takes of [`MESSAGE_KIB`] (at least one).
fn kib(len: usize) -> u32 {
    len.div_ceil(1024).max(1) as u32
}

/// The client message a frame carries, if any.
fn message_len(frame: &ToWorker) -> Option<usize> {
    match frame {
        ToWorker::Event(Stamped {
            event: RoomEvent::Message { text, .. },
            ..
        }) => Some(text.len()),
        _ => None,
    }
}

/// The sending end: the channel (used as it is for every frame) and the
/// bytes budget, which a client message is [`charge`](Self::charge)d to
/// first.
#[derive(Clone, Debug)]
pub struct WorkerQueue {
    frames: mpsc::Sender<ToWorker>,
    message_kib: Arc<Semaphore>,
}

/// A client message's share of the budget, taken for a frame about to be
/// queued: [`sent`](Self::sent) once it is, else given back when dropped.
#[must_use]
pub struct Charge<'a>(SemaphorePermit<'a>);

impl Charge<'_> {
    /// The frame is queued: its share stays taken until it leaves the queue.
    pub fn sent(self) {
        self.0.forget();
    }
}

impl WorkerQueue {
    /// Waits until the budget has room for a client message of `len` bytes.
    /// Fails only if the budget is closed (it never is).
    pub async fn charge(&self, len: usize) -> Result<Charge<'_>, AcquireError> {
        self.message_kib.acquire_many(kib(len)).await.map(Charge)
    }

    /// Sends `frame`, charged first if it carries a client message (the
    /// frames that rebuild a restored room).
    pub async fn send_charged(&self, frame: ToWorker) -> Result<(), ()> {
        let charge = match message_len(&frame) {
            Some(len) => Some(self.charge(len).await.map_err(|_| ())?),
            None => None,
        };
        self.frames.send(frame).await.map_err(|_| ())?;
        if let Some(charge) = charge {
            charge.sent();
        }
        Ok(())
    }
}

impl Deref for WorkerQueue {
    type Target = mpsc::Sender<ToWorker>;

    fn deref(&self) -> &mpsc::Sender<ToWorker> {
        &self.frames
    }
}

/// The receiving end: each frame taken gives its client message's bytes back.
pub struct WorkerFrames {
    frames: mpsc::Receiver<ToWorker>,
    message_kib: Arc<Semaphore>,
}

impl WorkerFrames {
    /// The next frame (`None` once every sender is gone).
    pub async fn recv(&mut self) -> Option<ToWorker> {
        let frame = self.frames.recv().await?;
        self.taken(&frame);
        Some(frame)
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Result<ToWorker, TryRecvError> {
        let frame = self.frames.try_recv()?;
        self.taken(&frame);
        Ok(frame)
    }

    fn taken(&self, frame: &ToWorker) {
        if let Some(len) = message_len(frame) {
            self.message_kib.add_permits(kib(len) as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contract::ipc::{ConnId, RoomId};
    use std::time::Duration;

    fn message(len: usize) -> ToWorker {
        ToWorker::Event(Stamped {
            room: RoomId("r".into()),
            seq: 1,
            time_ms: 0,
            event: RoomEvent::Message {
                conn: ConnId(1),
                text: "x".repeat(len),
            },
        })
    }

    /// 32 MiB of 64 KiB messages fill the budget long before the 8,192
    /// frames; the next waits until one leaves the queue, and a charge
    /// that is not sent is given back.
    #[tokio::test]
    async fn client_messages_wait_for_bytes_not_only_for_places() {
        let (queue, mut frames) = channel();
        let per = 64 * 1024;
        let fit = (MESSAGE_KIB / 64) as usize;
        for _ in 0..fit {
            queue.send_charged(message(per)).await.unwrap();
        }
        let next =
            tokio::time::timeout(Duration::from_millis(50), queue.send_charged(message(per)));
        assert!(next.await.is_err(), "the 513th 64 KiB message waits");
        // A frame without a client message is not held by the bytes.
        queue
            .send(ToWorker::CloseRoom {
                room: RoomId("r".into()),
            })
            .await
            .unwrap();
        // One leaves: one more fits.
        frames.recv().await.unwrap();
        queue.send_charged(message(per)).await.unwrap();
        // A charge dropped unsent is given back.
        frames.recv().await.unwrap();
        drop(queue.charge(per).await.unwrap());
        queue.charge(per).await.unwrap().sent();
        assert_eq!(queue.message_kib.available_permits(), 0);
    }
}
