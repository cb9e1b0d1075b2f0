//! The supervisor–worker socket as separate read and write halves that wake their
//! process only when there is something to read.
//!
//! Why not the socket as tokio registers it: a Unix stream socket reports
//! "writable" every time the peer reads from it, and tokio registers every socket
//! for both directions, edge-triggered. So each IPC frame the peer consumes woke
//! this process for nothing: on a busy core that is one extra context switch per
//! client message on each side (measured with `strace`: the worker woke twice per
//! frame, once with `EPOLLOUT` alone). Here the read half is registered for
//! readability only; the write half writes straight to the (non-blocking) socket
//! and registers a duplicate of it for writability only while the socket is full,
//! which happens only under backpressure.

use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use contract::ipc::{CodecError, decode, encode};
use interprocess::local_socket::tokio::Stream as LocalStream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// `tokio_util` codec reading `In` frames and writing `Out` frames (the
/// contract's [`encode`] and [`decode`]).
pub struct IpcCodec<In, Out>(PhantomData<fn(Out) -> In>);

impl<In, Out> IpcCodec<In, Out> {
    pub fn new() -> Self {
        IpcCodec(PhantomData)
    }
}

impl<In, Out> Default for IpcCodec<In, Out> {
    fn default() -> Self {
        Self::new()
    }
}

impl<In: DeserializeOwned, Out> tokio_util::codec::Decoder for IpcCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        let msg = decode(src)?;
        release_if_big(src);
        Ok(msg)
    }
}

impl<In, Out: Serialize> tokio_util::codec::Encoder<Out> for IpcCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, msg: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        // Everything before was written: the space a big frame needed goes.
        release_if_big(dst);
        encode(&msg, dst)
    }
}

/// A frame buffer emptied of a frame over this keeps no space for the next:
/// a full board's snapshot or checkpoint (12 MB) would otherwise keep its
/// size reserved on both sides of every worker's socket for good.
pub const RELEASE_ABOVE: usize = 1 << 20;

/// Gives an empty buffer's space back if it is over [`RELEASE_ABOVE`].
fn release_if_big(buffer: &mut BytesMut) {
    if buffer.is_empty() && buffer.capacity() > RELEASE_ABOVE {
        *buffer = BytesMut::new();
    }
}

/// Largest read per call: bounds the buffer space initialised for each read.
const MAX_READ: usize = 64 * 1024;

/// Splits a connected local socket into a read half and a write half.
pub fn split(stream: LocalStream) -> io::Result<(IpcReader, IpcWriter)> {
    let fd = match stream {
        LocalStream::UdSocket(socket) => OwnedFd::try_from(socket)?,
    };
    let socket = UnixStream::from(fd);
    socket.set_nonblocking(true)?;
    let write = socket.try_clone()?;
    Ok((
        IpcReader {
            socket: register(socket, Interest::READABLE).map_err(|(_, e)| e)?,
        },
        IpcWriter {
            state: WriteState::Direct(write),
        },
    ))
}

/// Registers a socket with the runtime's event loop for the given interest only.
fn register(
    socket: UnixStream,
    interest: Interest,
) -> Result<AsyncFd<UnixStream>, (UnixStream, io::Error)> {
    // SAFETY: the `UnixStream` owns its file descriptor and nothing replaces or
    // closes it while the `AsyncFd` holds it (it is only taken back with
    // `into_inner`).
    unsafe { AsyncFd::register_with_interest(socket, interest) }.map_err(|e| e.into_parts())
}

/// The read half, registered with the runtime for readability only.
pub struct IpcReader {
    socket: AsyncFd<UnixStream>,
}

impl AsyncRead for IpcReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.socket.poll_read_ready(cx))?;
            let want = buf.remaining().min(MAX_READ);
            let unfilled = buf.initialize_unfilled_to(want);
            match ready.try_io(|socket| socket.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    if n > 0 && n < want {
                        // A short read drained the socket: skip the read that would
                        // only say so (as tokio's own sockets do). A later arrival
                        // is a new edge, and the tick check keeps it from being lost.
                        ready.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Readiness was stale; it has been cleared, so poll again.
                Err(_would_block) => continue,
            }
        }
    }
}

/// The write half. Not registered with the runtime while writes go through.
pub struct IpcWriter {
    state: WriteState,
}

enum WriteState {
    /// Writes go straight to the socket.
    Direct(UnixStream),
    /// The socket was full: registered for writability until a write completes.
    Waiting(AsyncFd<UnixStream>),
    /// Only between two states, while one is moved out.
    Moved,
}

impl AsyncWrite for IpcWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match &mut self.state {
                WriteState::Direct(socket) => match socket.write(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let WriteState::Direct(socket) =
                            std::mem::replace(&mut self.state, WriteState::Moved)
                        else {
                            unreachable!("matched Direct above")
                        };
                        // Registering an edge-triggered fd that is already writable
                        // reports it at once, so no wake-up can be missed here.
                        match register(socket, Interest::WRITABLE) {
                            Ok(registered) => self.state = WriteState::Waiting(registered),
                            Err((socket, e)) => {
                                self.state = WriteState::Direct(socket);
                                return Poll::Ready(Err(e));
                            }
                        }
                    }
                    other => return Poll::Ready(other),
                },
                WriteState::Waiting(registered) => {
                    let mut ready = ready!(registered.poll_write_ready(cx))?;
                    let Ok(result) = ready.try_io(|socket| socket.get_ref().write(buf)) else {
                        continue; // stale readiness, cleared: poll again
                    };
                    let WriteState::Waiting(registered) =
                        std::mem::replace(&mut self.state, WriteState::Moved)
                    else {
                        unreachable!("matched Waiting above")
                    };
                    self.state = WriteState::Direct(registered.into_inner());
                    return Poll::Ready(result);
                }
                WriteState::Moved => unreachable!("state restored before returning"),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(())) // nothing is buffered here
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = match &self.state {
            WriteState::Direct(socket) => socket.shutdown(std::net::Shutdown::Write),
            WriteState::Waiting(registered) => {
                registered.get_ref().shutdown(std::net::Shutdown::Write)
            }
            WriteState::Moved => Ok(()),
        };
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use interprocess::local_socket::traits::tokio::{Listener as _, Stream as _};
    use interprocess::local_socket::{GenericNamespaced, ListenerOptions, ToNsName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> ((IpcReader, IpcWriter), (IpcReader, IpcWriter)) {
        let name = format!(
            "session-server-ipc-socket-test.{}.sock",
            rand::random::<u64>()
        );
        let ns_name = name.as_str().to_ns_name::<GenericNamespaced>().unwrap();
        let listener = ListenerOptions::new()
            .name(ns_name.clone())
            .create_tokio()
            .unwrap();
        let (accepted, connected) = tokio::join!(listener.accept(), LocalStream::connect(ns_name));
        (
            split(accepted.unwrap()).unwrap(),
            split(connected.unwrap()).unwrap(),
        )
    }

    /// Far more than the socket buffer holds goes through intact in both
    /// directions at once: the write half waits for room and resumes.
    #[tokio::test]
    async fn bytes_pass_both_ways_through_a_full_socket() {
        let ((mut a_read, mut a_write), (mut b_read, mut b_write)) = pair().await;
        let payload: Vec<u8> = (0..8_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let a_sends = tokio::spawn(async move {
            a_write.write_all(&sent).await.unwrap();
            a_write.shutdown().await.unwrap();
        });
        let sent = payload.clone();
        let b_sends = tokio::spawn(async move {
            b_write.write_all(&sent).await.unwrap();
            b_write.shutdown().await.unwrap();
        });
        let mut at_b = Vec::new();
        let mut at_a = Vec::new();
        let (read_b, read_a) =
            tokio::join!(b_read.read_to_end(&mut at_b), a_read.read_to_end(&mut at_a));
        read_b.unwrap();
        read_a.unwrap();
        a_sends.await.unwrap();
        b_sends.await.unwrap();
        assert_eq!(at_b.len(), payload.len());
        assert!(at_b == payload, "bytes a → b differ");
        assert!(at_a == payload, "bytes b → a differ");
    }

    /// A write to a socket whose peer is gone fails instead of hanging.
    #[tokio::test]
    async fn writing_to_a_closed_peer_fails() {
        let ((_a_read, mut a_write), b) = pair().await;
        drop(b);
        let chunk = vec![0u8; 64 * 1024];
        let mut failed = false;
        for _ in 0..1000 {
            if a_write.write_all(&chunk).await.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
    }

    /// A big frame's buffer space is given back once the frame is through:
    /// decoded (the reader's buffer) or written (the writer's, at the next
    /// frame).
    #[test]
    fn a_big_frame_leaves_no_big_buffer_behind() {
        use tokio_util::codec::{Decoder, Encoder};
        let mut codec = IpcCodec::<String, String>::new();
        let big = "x".repeat(4 * RELEASE_ABOVE);
        let mut wire = BytesMut::new();
        codec.encode(big.clone(), &mut wire).unwrap();
        assert!(wire.capacity() > RELEASE_ABOVE);
        let mut read = wire.clone();
        assert_eq!(codec.decode(&mut read).unwrap(), Some(big));
        assert!(read.capacity() <= RELEASE_ABOVE, "{}", read.capacity());
        wire.clear(); // written
        codec.encode("small".to_owned(), &mut wire).unwrap();
        assert!(wire.capacity() <= RELEASE_ABOVE, "{}", wire.capacity());
    }
}
