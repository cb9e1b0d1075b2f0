//! A client's WebSocket after the upgrade, as two independent halves: frames are
//! read and parsed by tungstenite; frames are written here, straight from the
//! shared snapshot bytes.
//!
//! Why not tungstenite for writing too: it copies every outgoing frame into a
//! per-connection buffer that grows to the largest frame ever sent and never
//! shrinks (a room of 1,000 shapes sends ~220 KB snapshots, so every member
//! would keep ~220 KB), and that copy is a memcpy of the whole snapshot per member
//! per update. Here a frame is one `writev` of a 2–10 byte header and the shared
//! `Bytes`: no copy in user space, nothing kept per connection.
//!
//! The read half gives tungstenite a socket whose writes go nowhere: the replies
//! tungstenite would send by itself (pong, close echo) are sent by the session
//! instead, through the write half. It is driven as a stream here
//! ([`ClientReader`]) rather than by tokio-tungstenite's, which allocates two
//! waker proxies per connection (128 bytes) for a write side this one has not.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::Stream;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, WebSocket};

use super::inflate::Inflater;

/// Frame opcodes (RFC 6455 §5.2).
const OPCODE_TEXT: u8 = 0x1;
/// The first reserved bit: set on a compressed message's first frame (RFC 7692).
const RSV1: u8 = 0x40;
const OPCODE_CLOSE: u8 = 0x8;
const OPCODE_PING: u8 = 0x9;
const OPCODE_PONG: u8 = 0xA;
/// Control frame payloads are at most 125 bytes (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// The client's frames, parsed by tungstenite: a stream of messages, which
/// ends (`None`) once the connection is closed or after its first error
/// (tungstenite's reader is not to be read again after one).
pub struct ClientReader {
    socket: WebSocket<Polled>,
    ended: bool,
}

impl Stream for ClientReader {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let reader = self.get_mut();
        if reader.ended {
            return Poll::Ready(None);
        }
        let polled = reader.socket.get_mut();
        if !polled
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            polled.waker = Some(cx.waker().clone());
        }
        match reader.socket.read() {
            Ok(message) => Poll::Ready(Some(Ok(message))),
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            Err(e) => {
                reader.ended = true;
                match e {
                    WsError::ConnectionClosed | WsError::AlreadyClosed => Poll::Ready(None),
                    e => Poll::Ready(Some(Err(e))),
                }
            }
        }
    }
}

/// [`ReadSide`] as the blocking `Read` tungstenite reads from: a read that
/// would wait says `WouldBlock`, and the task is woken (its waker, kept from
/// the last poll) when the socket has more. Writes go nowhere (see the module
/// comment).
pub struct Polled {
    side: ReadSide,
    waker: Option<std::task::Waker>,
}

impl io::Read for Polled {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let waker = self.waker.as_ref().unwrap_or(std::task::Waker::noop());
        let mut cx = Context::from_waker(waker);
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut self.side).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) => Ok(buf.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl io::Write for Polled {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A client connection over TLS.
type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Splits an upgraded connection into its reader and writer. With
/// `inflater` (permessage-deflate was negotiated), the reader inflates the
/// client's compressed messages.
pub async fn accept(
    upgraded: Upgraded,
    config: WebSocketConfig,
    inflater: Option<Inflater>,
) -> io::Result<(ClientReader, ClientWriter)> {
    // The server serves every connection as `TokioIo<TcpStream>` or, with TLS,
    // `TokioIo<TlsStream>`, so this only fails if that changes.
    let (read, write, early) = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let (read, write) = parts.io.into_inner().into_split();
            (Half::Plain(read), Half::Plain(write), parts.read_buf)
        }
        Err(upgraded) => {
            let parts = upgraded
                .downcast::<TokioIo<TlsStream>>()
                .map_err(|_| io::Error::other("upgraded connection is neither TCP nor TLS"))?;
            // TLS records are read and written through one session: the halves
            // share it behind a lock (only ever taken by this connection's task).
            let (read, write) = tokio::io::split(parts.io.into_inner());
            (Half::Tls(read), Half::Tls(write), parts.read_buf)
        }
    };
    // `read_buf` is a view into hyper's 8 KiB read buffer: keeping it would keep
    // that buffer alive for the connection's life, so its bytes (usually none)
    // are copied out.
    let read_side = ReadSide {
        socket: SocketSide {
            early: Bytes::copy_from_slice(&early),
            read,
        },
        inflater: inflater.map(Box::new),
    };
    let polled = Polled {
        side: read_side,
        waker: None,
    };
    let reader = ClientReader {
        socket: WebSocket::from_raw_socket(polled, Role::Server, Some(config)),
        ended: false,
    };
    Ok((reader, ClientWriter { socket: write }))
}

/// One direction of a client's socket: a TCP half, or a half of a TLS stream.
pub enum Half<Plain, Tls> {
    /// A plain TCP connection's half.
    Plain(Plain),
    /// A TLS connection's half (`--tls-cert`).
    Tls(Tls),
}

type ReadHalf = Half<OwnedReadHalf, tokio::io::ReadHalf<TlsStream>>;
type WriteHalf = Half<OwnedWriteHalf, tokio::io::WriteHalf<TlsStream>>;

impl<P: AsyncRead + Unpin, T: AsyncRead + Unpin> AsyncRead for Half<P, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Half::Plain(half) => Pin::new(half).poll_read(cx, buf),
            Half::Tls(half) => Pin::new(half).poll_read(cx, buf),
        }
    }
}

impl<P: AsyncWrite + Unpin, T: AsyncWrite + Unpin> AsyncWrite for Half<P, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Half::Plain(half) => Pin::new(half).poll_write(cx, buf),
            Half::Tls(half) => Pin::new(half).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Half::Plain(half) => Pin::new(half).poll_write_vectored(cx, bufs),
            Half::Tls(half) => Pin::new(half).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Half::Plain(half) => half.is_write_vectored(),
            Half::Tls(half) => half.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Half::Plain(half) => Pin::new(half).poll_flush(cx),
            Half::Tls(half) => Pin::new(half).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Half::Plain(half) => Pin::new(half).poll_shutdown(cx),
            Half::Tls(half) => Pin::new(half).poll_shutdown(cx),
        }
    }
}

/// The socket's read half, plus any bytes hyper read past the upgrade request,
/// and with permessage-deflate what inflates the client's compressed messages.
pub struct ReadSide {
    socket: SocketSide,
    /// Boxed: only connections that negotiated compression pay for it.
    inflater: Option<Box<Inflater>>,
}

/// The bytes as they come: early ones first, then the socket's.
struct SocketSide {
    early: Bytes,
    read: ReadHalf,
}

impl SocketSide {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early[..n]);
            self.early.advance(n);
            if self.early.is_empty() {
                self.early = Bytes::new(); // free the copy
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

/// Bytes read from the socket at a time for the inflater.
const INFLATER_READ_BYTES: usize = 4096;

impl AsyncRead for ReadSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let ReadSide { socket, inflater } = self.get_mut();
        let Some(inflater) = inflater else {
            return socket.poll_read(cx, buf);
        };
        loop {
            // What is gathered first, one message at a time; then the socket.
            inflater.process().map_err(io::Error::other)?;
            let n = inflater.take_ready(buf.initialize_unfilled());
            if n > 0 {
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0; INFLATER_READ_BYTES];
            let mut raw = ReadBuf::new(&mut chunk);
            ready!(socket.poll_read(cx, &mut raw))?;
            if raw.filled().is_empty() {
                inflater.finish();
                if !inflater.has_ready() {
                    return Poll::Ready(Ok(())); // the end of the stream
                }
                continue;
            }
            // Read as an I/O error by tungstenite; the session closes with
            // the code it names (see `session`).
            inflater.push(raw.filled()).map_err(io::Error::other)?;
        }
    }
}

/// Writes server frames (unmasked) to the client.
pub struct ClientWriter {
    socket: WriteHalf,
}

impl ClientWriter {
    /// One text frame of `payload` (a snapshot, an ops batch, a reply).
    pub fn text<'a>(&'a mut self, payload: &'a [u8]) -> WriteFrame<'a> {
        self.frame(OPCODE_TEXT, [payload, &[]])
    }

    /// A text frame of `head` then `body`, without copying them together (a
    /// v2 snapshot is a short prefix and the shared v1 snapshot's bytes).
    pub fn text_parts<'a>(&'a mut self, head: &'a [u8], body: &'a [u8]) -> WriteFrame<'a> {
        self.frame(OPCODE_TEXT, [head, body])
    }

    /// A compressed text message (permessage-deflate: RSV1 set) whose payload
    /// is `head` then `body` (DEFLATE segments, the last one's trailer off).
    pub fn compressed_text<'a>(&'a mut self, head: &'a [u8], body: &'a [u8]) -> WriteFrame<'a> {
        self.frame(RSV1 | OPCODE_TEXT, [head, body])
    }

    /// An empty ping: a silent client's pong says it is still there (the
    /// keep-alive, and the probe when its user connects again).
    pub fn ping(&mut self) -> WriteFrame<'_> {
        self.frame(OPCODE_PING, [&[], &[]])
    }

    /// Answers a client's ping with its payload.
    pub fn pong<'a>(&'a mut self, payload: &'a [u8]) -> WriteFrame<'a> {
        let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
        self.frame(OPCODE_PONG, [payload, &[]])
    }

    /// A close frame with a code and a reason (cut to fit a control frame).
    pub async fn close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        let mut payload = Vec::with_capacity(MAX_CONTROL_PAYLOAD);
        payload.extend_from_slice(&code.to_be_bytes());
        let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        payload.extend_from_slice(&reason.as_bytes()[..cut]);
        self.frame(OPCODE_CLOSE, [&payload, &[]]).await?;
        self.socket.flush().await
    }

    /// One frame whose payload is `payload`'s parts.
    fn frame<'a>(&'a mut self, first: u8, payload: [&'a [u8]; 2]) -> WriteFrame<'a> {
        let (header, header_len) = frame_header(first, payload[0].len() + payload[1].len());
        WriteFrame {
            socket: &mut self.socket,
            header,
            header_at: 0,
            header_len: header_len as u8,
            payload,
        }
    }
}

/// A frame on its way to the client: its header and its payload's parts,
/// written without copying them together (one `writev` when the socket takes
/// it all, the usual case). A plain future rather than an `async fn`: it is
/// part of the session's future, which every connection keeps for its life,
/// and an `async fn` would keep its arguments twice and its slices array on
/// top.
#[must_use = "a frame is written only when awaited"]
pub struct WriteFrame<'a> {
    socket: &'a mut WriteHalf,
    header: [u8; 10],
    /// How much of the header is written.
    header_at: u8,
    header_len: u8,
    /// What is left of the payload.
    payload: [&'a [u8]; 2],
}

impl Future for WriteFrame<'_> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let header = &this.header[this.header_at as usize..this.header_len as usize];
            if header.is_empty() && this.payload.iter().all(|part| part.is_empty()) {
                return Poll::Ready(Ok(()));
            }
            let slices = [
                IoSlice::new(header),
                IoSlice::new(this.payload[0]),
                IoSlice::new(this.payload[1]),
            ];
            let written = ready!(Pin::new(&mut *this.socket).poll_write_vectored(cx, &slices))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let from_header = written.min(header.len());
            this.header_at += from_header as u8;
            let mut left = written - from_header;
            for part in &mut this.payload {
                let n = left.min(part.len());
                *part = &part[n..];
                left -= n;
            }
        }
    }
}

/// What a client's upgrade settled.
#[derive(Clone, Copy, Debug)]
pub struct Negotiated {
    /// The protocol it speaks.
    pub protocol: Protocol,
    /// permessage-deflate: messages either way may come compressed.
    pub deflate: bool,
}

/// The protocol a client asked for in its upgrade request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// The default: a full snapshot on every change (PROTOCOL.md).
    V1,
    /// One snapshot, then ops (PROTOCOL-v2.md).
    V2,
}

impl Protocol {
    /// V2 when `whiteboard.v2` is among the offered subprotocols (the
    /// `Sec-WebSocket-Protocol` headers: comma-separated, possibly repeated);
    /// anything else is v1.
    pub fn negotiate(headers: &hyper::HeaderMap) -> Protocol {
        let offered = headers
            .get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == contract::protocol::v2::SUBPROTOCOL);
        if offered { Protocol::V2 } else { Protocol::V1 }
    }

    /// The `Sec-WebSocket-Protocol` the `101` answers with, if any (v1 answers
    /// without one, as before).
    pub fn response_header(self) -> Option<hyper::header::HeaderValue> {
        match self {
            Protocol::V1 => None,
            Protocol::V2 => Some(hyper::header::HeaderValue::from_static(
                contract::protocol::v2::SUBPROTOCOL,
            )),
        }
    }
}

/// permessage-deflate as the server answers it (RFC 7692): no context
/// takeover either way, so one compressed payload is right for every member
/// and no connection keeps a compressor.
pub const DEFLATE_RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Whether the client offers permessage-deflate in a form this server can
/// accept: one of its offers (`Sec-WebSocket-Extensions`, comma-separated,
/// possibly repeated) names it with known parameters, none twice, and no
/// `server_max_window_bits` (this server's payloads are compressed once for
/// everyone, with the full window; every browser offers the plain form).
pub fn deflate_offered(headers: &hyper::HeaderMap) -> bool {
    headers
        .get_all(hyper::header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(acceptable_deflate_offer)
}

fn acceptable_deflate_offer(offer: &str) -> bool {
    let mut parts = offer.split(';').map(str::trim);
    if parts.next() != Some("permessage-deflate") {
        return false;
    }
    let mut seen = Vec::new();
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (param, None),
        };
        if seen.contains(&name) {
            return false;
        }
        seen.push(name);
        let ok = match name {
            "server_no_context_takeover" | "client_no_context_takeover" => value.is_none(),
            // The client may limit its own window: any is inflated here.
            "client_max_window_bits" => value.is_none_or(|v| {
                v.parse::<u8>().is_ok_and(|bits| (8..=15).contains(&bits)) && !v.starts_with('0')
            }),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// A final, unmasked frame's header: (bytes, length used). `first` is the
/// opcode, with [`RSV1`] for a compressed message.
fn frame_header(first: u8, len: usize) -> ([u8; 10], usize) {
    let mut header = [0u8; 10];
    header[0] = 0x80 | first; // FIN
    let used = if len < 126 {
        header[1] = len as u8;
        2
    } else if len <= usize::from(u16::MAX) {
        header[1] = 126;
        header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (header, used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_is_accepted_in_the_forms_clients_offer_it() {
        use hyper::header::{HeaderMap, HeaderValue, SEC_WEBSOCKET_EXTENSIONS};
        let offer = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_static(v));
            }
            deflate_offered(&headers)
        };
        assert!(!offer(&[]));
        // Chromium and Firefox; Node's ws.
        assert!(offer(&["permessage-deflate; client_max_window_bits"]));
        assert!(offer(&["permessage-deflate"]));
        assert!(offer(&["permessage-deflate; client_max_window_bits=10"]));
        assert!(offer(&[
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ]));
        // A second offer this server can take.
        assert!(offer(&[
            "permessage-deflate; server_max_window_bits=10, permessage-deflate"
        ]));
        assert!(offer(&["x-webkit-deflate-frame", "permessage-deflate"]));
        assert!(!offer(&["permessage-deflate; server_max_window_bits=10"]));
        assert!(!offer(&["permessage-deflate; client_max_window_bits=16"]));
        assert!(!offer(&[
            "permessage-deflate; client_max_window_bits; client_max_window_bits"
        ]));
        assert!(!offer(&["permessage-deflate; mystery"]));
        assert!(!offer(&["permessage-deflatex"]));
    }

    #[test]
    fn v2_is_chosen_only_when_offered() {
        use hyper::header::{HeaderMap, HeaderValue, SEC_WEBSOCKET_PROTOCOL};
        let offer = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(v));
            }
            Protocol::negotiate(&headers)
        };
        assert_eq!(offer(&[]), Protocol::V1);
        assert_eq!(offer(&["whiteboard.v3"]), Protocol::V1);
        assert_eq!(offer(&["whiteboard.v2x, chat"]), Protocol::V1);
        assert_eq!(offer(&["whiteboard.v2"]), Protocol::V2);
        assert_eq!(offer(&["chat, whiteboard.v2"]), Protocol::V2);
        assert_eq!(offer(&["chat", "whiteboard.v2"]), Protocol::V2);
        assert_eq!(Protocol::V1.response_header(), None);
        assert_eq!(
            Protocol::V2.response_header().unwrap(),
            HeaderValue::from_static("whiteboard.v2")
        );
    }

    /// A frame larger than the socket takes at once is written across many
    /// partial `writev`s (and waits while the peer does not read), and arrives
    /// whole: header, then both parts, in order.
    #[tokio::test]
    async fn a_frame_is_written_whole_across_partial_writes() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (mut client, (server, _)) = (client.unwrap(), accepted.unwrap());
        let (_read, write) = server.into_split();
        let mut writer = ClientWriter {
            socket: Half::Plain(write),
        };
        let head: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let body: Vec<u8> = (0..4_000_000u32).map(|i| (i % 241) as u8).collect();
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = vec![0; 64 * 1024];
            while got.len() < 10 + 1000 + 4_000_000 {
                // Slowly at first, so the writer finds the socket full.
                if got.len() < 1_000_000 {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                let n = client.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the connection ended early");
                got.extend_from_slice(&chunk[..n]);
            }
            got
        });
        writer.text_parts(&head, &body).await.unwrap();
        writer.ping().await.unwrap();
        let got = reading.await.unwrap();
        let (header, n) = frame_header(OPCODE_TEXT, head.len() + body.len());
        assert_eq!(n, 10);
        assert_eq!(&got[..10], &header[..10]);
        assert!(got[10..1010] == head[..], "the head arrived as written");
        assert!(
            got[1010..4_001_010] == body[..],
            "the body arrived as written"
        );
    }

    /// Headers for each of the three length encodings, as RFC 6455 §5.2 lays
    /// them out.
    #[test]
    fn frame_headers_use_the_shortest_length_encoding() {
        let (h, n) = frame_header(OPCODE_TEXT, 125);
        assert_eq!(&h[..n], &[0x81, 125]);
        let (h, n) = frame_header(OPCODE_TEXT, 126);
        assert_eq!(&h[..n], &[0x81, 126, 0, 126]);
        let (h, n) = frame_header(OPCODE_TEXT, 65_535);
        assert_eq!(&h[..n], &[0x81, 126, 0xff, 0xff]);
        let (h, n) = frame_header(OPCODE_TEXT, 65_536);
        assert_eq!(&h[..n], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        let (h, n) = frame_header(OPCODE_CLOSE, 0);
        assert_eq!(&h[..n], &[0x88, 0]);
    }
}
