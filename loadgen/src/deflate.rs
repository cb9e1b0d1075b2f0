//! permessage-deflate (RFC 7692) on the generator's side, for `fanout --deflate`.
//!
//! Why a transcoder: tokio-tungstenite 0.30 does not implement the extension
//! and fails the connection on any frame with RSV1 set. So [`Inflating`] sits
//! between the socket and tungstenite: a compressed message (RSV1 on its first
//! frame; its payload raw DEFLATE without the `00 00 ff ff` trailer) is
//! gathered, inflated on its own (no context takeover was agreed) and handed
//! on as one plain, final frame; every other frame, and the HTTP response
//! before the first one, passes through unchanged, so tungstenite still checks
//! them. Writes pass through too: the generator's own messages go
//! uncompressed, which the extension allows (compression is per message).
//!
//! Inflating is `contract::deflate::inflate_message` (flate2, a fresh raw
//! inflater per message, the trailer put back): the crate's dependencies stay
//! as they are. Every inflated message is then parsed as the protocol's JSON,
//! which a wrong inflation would not survive.
//!
//! It also logs what each text message took on the wire (see [`WireLog`]),
//! which the reader can no longer see once tungstenite has the inflated frame.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use contract::deflate::inflate_message;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Io;

/// The offer, as Chromium and Firefox send it.
pub const OFFER: &str = "permessage-deflate; client_max_window_bits";

/// Largest message inflated (tungstenite's default `max_message_size`).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Frame opcodes (RFC 6455 §5.2).
const OPCODE_CONTINUATION: u8 = 0x0;
const OPCODE_TEXT: u8 = 0x1;

/// The end of the HTTP response: frames start after it.
const RESPONSE_END: &[u8; 4] = b"\r\n\r\n";

/// One text message as it came over the wire.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    /// Its frames' headers and payloads as sent (compressed, if it was).
    pub wire_bytes: u64,
    /// Whether it came compressed (RSV1).
    pub compressed: bool,
}

/// The bytes of a text message sent as one unmasked frame of `len` payload
/// bytes, its 2–10 byte header included (what the server sends).
pub fn plain_wire_bytes(len: usize) -> u64 {
    let header = match len {
        0..126 => 2,
        126..=65_535 => 4,
        _ => 10,
    };
    (header + len) as u64
}

/// What one connection's transcoder tells its reader.
#[derive(Default)]
pub struct WireLog {
    /// Text messages handed to tungstenite, in order, not yet taken.
    received: Mutex<VecDeque<Received>>,
    /// Compressed messages that could not be inflated, or broke the framing
    /// rules of the extension (the connection fails with an I/O error then).
    errors: AtomicU64,
}

impl WireLog {
    /// The oldest text message not yet taken: call once for every text
    /// message tungstenite yields.
    pub fn take(&self) -> Option<Received> {
        self.received.lock().expect("wire log").pop_front()
    }

    /// Messages that failed (see `errors`).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn push(&self, received: Received) {
        self.received.lock().expect("wire log").push_back(received);
    }
}

/// A compressed message being gathered.
struct Gathering {
    opcode: u8,
    /// Its payload so far (compressed).
    payload: Vec<u8>,
    wire_bytes: u64,
}

/// A client socket whose compressed server messages tungstenite reads inflated.
pub struct Inflating {
    inner: Box<dyn Io>,
    log: Arc<WireLog>,
    /// How much of [`RESPONSE_END`] has been seen: frames follow once all.
    response_end: usize,
    /// One read from the socket.
    read_buf: Box<[u8]>,
    /// Bytes read and not yet handled (at most a frame's head, or the part
    /// of a compressed frame that has come).
    raw: Vec<u8>,
    /// Bytes for tungstenite, from `ready_from` on.
    ready: Vec<u8>,
    ready_from: usize,
    /// Payload bytes of the passed-through frame still to come.
    passing: u64,
    /// The uncompressed message being passed through, if it is fragmented:
    /// whether it is text, and its wire bytes so far.
    plain: Option<(bool, u64)>,
    gathering: Option<Gathering>,
    eof: bool,
}

impl Inflating {
    pub fn new(inner: Box<dyn Io>, log: Arc<WireLog>) -> Inflating {
        Inflating {
            inner,
            log,
            response_end: 0,
            read_buf: vec![0; 16 * 1024].into_boxed_slice(),
            raw: Vec::new(),
            ready: Vec::new(),
            ready_from: 0,
            passing: 0,
            plain: None,
            gathering: None,
            eof: false,
        }
    }

    /// Handles `bytes` read from the socket.
    fn push(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut bytes = bytes;
        // The HTTP response passes as it is.
        while self.response_end < RESPONSE_END.len() {
            let Some((&b, rest)) = bytes.split_first() else {
                return Ok(());
            };
            self.ready.push(b);
            bytes = rest;
            self.response_end = if b == RESPONSE_END[self.response_end] {
                self.response_end + 1
            } else {
                usize::from(b == b'\r')
            };
        }
        self.raw.extend_from_slice(bytes);
        self.process().inspect_err(|e| {
            self.log.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("loadgen: a server message broke permessage-deflate: {e}");
        })
    }

    fn process(&mut self) -> io::Result<()> {
        loop {
            if self.passing > 0 {
                let n = self.passing.min(self.raw.len() as u64) as usize;
                if n == 0 {
                    return Ok(());
                }
                self.ready.extend_from_slice(&self.raw[..n]);
                self.raw.drain(..n);
                self.passing -= n as u64;
                continue;
            }
            let Some(head) = Head::parse(&self.raw) else {
                return Ok(());
            };
            let wire_bytes = head.len as u64 + head.payload;
            let ours = !head.is_control()
                && !head.masked
                && if head.opcode == OPCODE_CONTINUATION {
                    self.gathering.is_some()
                } else {
                    head.rsv1
                };
            if !ours {
                if !head.is_control() {
                    if self.gathering.is_some() {
                        return Err(invalid("a new message inside a compressed one"));
                    }
                    self.log_plain(&head, wire_bytes);
                }
                // Not ours to change: tungstenite reads it (and refuses what
                // breaks the protocol, RSV1 on a control frame included).
                self.ready.extend_from_slice(&self.raw[..head.len]);
                self.raw.drain(..head.len);
                self.passing = head.payload;
                continue;
            }
            if head.opcode == OPCODE_CONTINUATION && head.rsv1 {
                return Err(invalid("RSV1 on a continuation frame"));
            }
            if self.plain.is_some() {
                return Err(invalid("a compressed message inside a fragmented one"));
            }
            let whole = head.len + head.payload as usize;
            if self.raw.len() < whole {
                self.raw.reserve(whole - self.raw.len());
                return Ok(());
            }
            let gathering = self.gathering.get_or_insert_with(|| Gathering {
                opcode: head.opcode,
                payload: Vec::new(),
                wire_bytes: 0,
            });
            gathering
                .payload
                .extend_from_slice(&self.raw[head.len..whole]);
            gathering.wire_bytes += wire_bytes;
            self.raw.drain(..whole);
            if head.fin {
                let gathering = self.gathering.take().expect("gathered above");
                let inflated = inflate_message(&gathering.payload, MAX_MESSAGE_BYTES)
                    .map_err(|e| invalid(&e.to_string()))?;
                self.emit(gathering.opcode, &inflated);
                if gathering.opcode == OPCODE_TEXT {
                    self.log.push(Received {
                        wire_bytes: gathering.wire_bytes,
                        compressed: true,
                    });
                }
            }
        }
    }

    /// Logs a passed-through data frame's part of its message.
    fn log_plain(&mut self, head: &Head, wire_bytes: u64) {
        let (text, so_far) = match self.plain.take() {
            Some(message) if head.opcode == OPCODE_CONTINUATION => message,
            // A stray continuation: tungstenite fails the connection.
            None if head.opcode == OPCODE_CONTINUATION => return,
            _ => (head.opcode == OPCODE_TEXT, 0),
        };
        let wire_bytes = so_far + wire_bytes;
        if !head.fin {
            self.plain = Some((text, wire_bytes));
        } else if text {
            self.log.push(Received {
                wire_bytes,
                compressed: false,
            });
        }
    }

    /// One final, unmasked frame of `payload`, for tungstenite.
    fn emit(&mut self, opcode: u8, payload: &[u8]) {
        let len = payload.len();
        self.ready.reserve(10 + len);
        self.ready.push(0x80 | opcode);
        if len < 126 {
            self.ready.push(len as u8);
        } else if len <= usize::from(u16::MAX) {
            self.ready.push(126);
            self.ready.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.ready.push(127);
            self.ready.extend_from_slice(&(len as u64).to_be_bytes());
        }
        self.ready.extend_from_slice(payload);
    }

    /// Moves ready bytes into `buf`.
    fn take_ready(&mut self, buf: &mut ReadBuf<'_>) {
        let ready = &self.ready[self.ready_from..];
        let n = buf.remaining().min(ready.len());
        buf.put_slice(&ready[..n]);
        self.ready_from += n;
        if self.ready_from == self.ready.len() {
            self.ready.clear();
            self.ready_from = 0;
            if self.ready.capacity() > 1 << 20 {
                // Not kept at the largest message's size.
                self.ready = Vec::new();
            }
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

impl AsyncRead for Inflating {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_from < this.ready.len() {
                this.take_ready(buf);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut this.read_buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                // Whatever was not a whole frame goes to tungstenite as it is
                // (it reports the truncation).
                this.eof = true;
                let rest = std::mem::take(&mut this.raw);
                this.ready.extend_from_slice(&rest);
                continue;
            }
            let read_buf = std::mem::take(&mut this.read_buf);
            let pushed = this.push(&read_buf[..n]);
            this.read_buf = read_buf;
            pushed?;
        }
    }
}

impl AsyncWrite for Inflating {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A frame's head (RFC 6455 §5.2).
struct Head {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    masked: bool,
    /// Bytes of the head.
    len: usize,
    /// Bytes of the payload that follows.
    payload: u64,
}

impl Head {
    /// The head at the start of `bytes`, once all of it has come.
    fn parse(bytes: &[u8]) -> Option<Head> {
        let (&first, rest) = bytes.split_first()?;
        let (&second, rest) = rest.split_first()?;
        let (payload, rest) = match second & 0x7f {
            126 => (
                u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
                &rest[2..],
            ),
            127 => (
                u64::from_be_bytes(rest.get(..8)?.try_into().ok()?),
                &rest[8..],
            ),
            n => (u64::from(n), rest),
        };
        let masked = second & 0x80 != 0;
        if masked && rest.len() < 4 {
            return None;
        }
        Some(Head {
            fin: first & 0x80 != 0,
            rsv1: first & 0x40 != 0,
            opcode: first & 0x0f,
            masked,
            len: bytes.len() - rest.len() + if masked { 4 } else { 0 },
            payload,
        })
    }

    fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contract::deflate::deflate_message;

    /// A server frame: unmasked.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 65_535 => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    fn transcoder() -> (Inflating, Arc<WireLog>) {
        let log = Arc::new(WireLog::default());
        let (socket, _) = tokio::io::duplex(64);
        (Inflating::new(Box::new(socket), log.clone()), log)
    }

    #[test]
    fn compressed_messages_reach_tungstenite_inflated_and_the_rest_as_they_came() {
        let (mut t, log) = transcoder();
        let response = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
        let text = "{\"shapes\":[".to_owned() + &"{\"id\":\"a\",\"x\":1},".repeat(500) + "]}";
        let compressed = frame(0xc1, &deflate_message(text.as_bytes()));
        let plain = frame(0x81, b"{\"cursors\":[]}");
        let ping = frame(0x89, b"hi");
        // Fragmented: RSV1 on the first frame only, a ping in between.
        let deflated = deflate_message(text.as_bytes());
        let (a, b) = deflated.split_at(deflated.len() / 2);
        let mut fragmented = frame(0x41, a);
        fragmented.extend(frame(0x89, b"p"));
        fragmented.extend(frame(0x80, b));
        let mut all = response.to_vec();
        for part in [&compressed, &plain, &ping, &fragmented] {
            all.extend_from_slice(part);
        }
        // Byte by byte: every split of a head, a payload or the response.
        for byte in &all {
            t.push(&[*byte]).unwrap();
        }
        let mut expected = response.to_vec();
        expected.extend(frame(0x81, text.as_bytes()));
        expected.extend_from_slice(&plain);
        expected.extend_from_slice(&ping);
        expected.extend(frame(0x89, b"p"));
        expected.extend(frame(0x81, text.as_bytes()));
        assert_eq!(&t.ready[..], &expected[..]);
        let logged: Vec<(u64, bool)> = std::iter::from_fn(|| log.take())
            .map(|r| (r.wire_bytes, r.compressed))
            .collect();
        assert_eq!(
            logged,
            [
                (compressed.len() as u64, true),
                (plain.len() as u64, false),
                (fragmented.len() as u64 - 3, true),
            ]
        );
        assert_eq!(plain_wire_bytes(14), plain.len() as u64);
        assert!(t.raw.is_empty() && t.gathering.is_none());
    }

    #[test]
    fn garbage_and_broken_framing_are_errors() {
        let (mut t, log) = transcoder();
        t.push(b"\r\n\r\n").unwrap();
        assert!(t.push(&frame(0xc1, &[0xff; 40])).is_err());
        let (mut t, _) = transcoder();
        t.push(b"\r\n\r\n").unwrap();
        let mut bytes = frame(0x41, &deflate_message(b"abc"));
        bytes.extend(frame(0x81, b"x"));
        assert!(t.push(&bytes).is_err());
        assert_eq!(log.errors(), 1);
    }
}
