//! A WebSocket client written out by hand, for what tungstenite's client
//! cannot do: offer permessage-deflate (RFC 7692), see each frame's reserved
//! bits, and send compressed messages. Inflating uses flate2 directly, not the
//! server's own code, so a fault there is not hidden by the same fault here.

use std::time::Instant;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{PATIENCE, Server};

/// A frame as the server sent it.
#[derive(Debug)]
pub struct RawFrame {
    /// FIN, RSV1–3 and the opcode, as on the wire.
    pub first: u8,
    /// The payload, as on the wire (compressed when RSV1 is set).
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// RSV1: a compressed message (RFC 7692).
    pub fn compressed(&self) -> bool {
        self.first & 0x40 != 0
    }

    pub fn opcode(&self) -> u8 {
        self.first & 0x0f
    }

    /// The text it carries, inflated if it is compressed.
    pub fn text(&self) -> String {
        let bytes = if self.compressed() {
            inflate(&self.payload)
        } else {
            self.payload.clone()
        };
        String::from_utf8(bytes).expect("text is UTF-8")
    }

    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode() == 0x8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// A permessage-deflate payload inflated (the trailer put back, RFC 7692 §7.2.2).
pub fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
    let mut inflater = Decompress::new(false);
    let mut out = Vec::with_capacity(input.len() * 20 + 1024);
    loop {
        let before = inflater.total_in();
        inflater
            .decompress_vec(
                &input[inflater.total_in() as usize..],
                &mut out,
                FlushDecompress::Sync,
            )
            .expect("valid DEFLATE");
        if inflater.total_in() as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        if inflater.total_in() == before && out.len() < out.capacity() {
            panic!("inflating made no progress");
        }
        out.reserve(out.capacity());
    }
}

/// `text` compressed as a client would send it (level 9; the trailer off).
pub fn deflate(text: &[u8]) -> Vec<u8> {
    let mut compressor = Compress::new(Compression::best(), false);
    let mut out = Vec::with_capacity(text.len() + 1024);
    compressor
        .compress_vec(text, &mut out, FlushCompress::Sync)
        .unwrap();
    assert_eq!(compressor.total_in() as usize, text.len());
    assert!(out.ends_with(&[0x00, 0x00, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// A client over `S`: a TCP stream, or a TLS one (`RawClient::upgrade`).
pub struct RawClient<S = TcpStream> {
    stream: S,
    buf: Vec<u8>,
    /// The `Sec-WebSocket-Extensions` the server answered, if any.
    pub extensions: Option<String>,
}

impl Server {
    /// Connects `user` to `room` by hand, offering `extensions` (a
    /// `Sec-WebSocket-Extensions` value) if given.
    pub async fn raw_client(&self, user: &str, room: &str, extensions: Option<&str>) -> RawClient {
        let offer = extensions
            .map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n"))
            .unwrap_or_default();
        self.raw_client_with(user, room, &offer).await
    }

    /// Connects `user` to `room` by hand with `headers` (whole lines, each
    /// ending in CRLF) added to the upgrade request.
    pub async fn raw_client_with(&self, user: &str, room: &str, offer: &str) -> RawClient {
        let stream = TcpStream::connect(self.host()).await.unwrap();
        RawClient::upgrade(stream, &self.host(), &self.token(user, room), offer).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    /// Upgrades `stream` with `token` for `host`, with `offer` (whole header
    /// lines) added to the request.
    pub async fn upgrade(mut stream: S, host: &str, token: &str, offer: &str) -> RawClient<S> {
        let request = format!(
            "GET /?token={token} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{offer}\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut client = RawClient {
            stream,
            buf: Vec::new(),
            extensions: None,
        };
        let head_end = loop {
            if let Some(at) = client.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            client.fill().await;
        };
        let head = String::from_utf8_lossy(&client.buf[..head_end]).into_owned();
        client.buf.drain(..head_end);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        client.extensions = head
            .lines()
            .find(|l| {
                l.to_ascii_lowercase()
                    .starts_with("sec-websocket-extensions:")
            })
            .map(|l| l["sec-websocket-extensions:".len()..].trim().to_owned());
        client
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk))
            .await
            .expect("bytes in time")
            .expect("read");
        assert!(n > 0, "connection ended");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// The next frame (final, unmasked, as a server sends them).
    pub async fn next_frame(&mut self) -> RawFrame {
        loop {
            if self.buf.len() >= 2 {
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                if len != usize::MAX && self.buf.len() >= at + len {
                    let first = self.buf[0];
                    assert_ne!(first & 0x80, 0, "the server sends final frames");
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return RawFrame { first, payload };
                }
            }
            self.fill().await;
        }
    }

    /// The frames that come until none has for `quiet` (to keep reading
    /// while sending much).
    pub async fn frames_within(&mut self, quiet: std::time::Duration) -> Vec<RawFrame> {
        let mut frames = Vec::new();
        while let Ok(frame) = tokio::time::timeout(quiet, self.next_frame()).await {
            frames.push(frame);
        }
        frames
    }

    /// Reads and drops whatever comes within `wait` (framing is lost: for a
    /// client that only needs to keep its socket drained); the bytes read.
    pub async fn discard_for(&mut self, wait: std::time::Duration) -> usize {
        let mut total = std::mem::take(&mut self.buf).len();
        let mut chunk = vec![0u8; 1 << 16];
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await
        {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    }

    /// The next text message (pings and pongs skipped).
    pub async fn next_text_frame(&mut self) -> RawFrame {
        let deadline = Instant::now() + PATIENCE;
        loop {
            assert!(Instant::now() < deadline, "no text frame in time");
            let frame = self.next_frame().await;
            match frame.opcode() {
                0x1 => return frame,
                0x8 => panic!("closed: {:?}", frame.close_code()),
                _ => continue,
            }
        }
    }

    /// The close code the server ends with (text frames skipped).
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            let frame = self.next_frame().await;
            if frame.opcode() == 0x8 {
                return frame.close_code();
            }
        }
    }

    /// Sends a masked frame: `first` is FIN, RSV and the opcode.
    pub async fn send_frame(&mut self, first: u8, payload: &[u8]) {
        let key = [0x5a, 0x13, 0xc4, 0x7e];
        let mut frame = vec![first];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 65535 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        self.stream.write_all(&frame).await.unwrap();
    }

    /// Sends `text` as a compressed text message (RSV1).
    pub async fn send_compressed(&mut self, text: &str) {
        self.send_frame(0xc1, &deflate(text.as_bytes())).await;
    }

    /// Sends `text` uncompressed.
    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(0x81, text.as_bytes()).await;
    }
}
