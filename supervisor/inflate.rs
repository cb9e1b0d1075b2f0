//! The read side of permessage-deflate (RFC 7692): tungstenite does not
//! implement the extension, so a client's compressed messages are inflated
//! here, between the socket and tungstenite, and handed on as the plain
//! frames tungstenite already reads. Frames of uncompressed messages (RSV1
//! clear: compression is per message) and control frames pass through as they
//! are, so tungstenite still enforces every rule and limit on them.
//!
//! A compressed message is gathered whole (its fragments, compressed, at most
//! [`compressed_limit`] bytes), inflated to at most `--max-message-bytes`
//! (past it: [`InflateError::TooBig`], closed with 1009, however small the
//! compressed bytes were), and handed on as one frame, masked with a zero key
//! as a client frame must be.

use bytes::{Buf, BytesMut};
use prometheus_client::metrics::counter::Counter;

use contract::deflate::{InflateError, inflate_message};

/// Frame opcodes (RFC 6455 §5.2) this needs to tell apart.
const OPCODE_CONTINUATION: u8 = 0x0;
const OPCODE_CONTROL: u8 = 0x8;

/// Most compressed bytes a message may have: incompressible text grows by a
/// few bytes per 16 KiB block, never by a sixteenth.
fn compressed_limit(limit: usize) -> usize {
    limit + limit / 16 + 1024
}

/// A client's bytes on their way to tungstenite, compressed messages inflated.
#[derive(Default)]
pub struct Inflater {
    /// Bytes read from the socket and not yet handled (at most one frame's
    /// head, or the part of a compressed frame's payload that has come).
    raw: BytesMut,
    /// Bytes for tungstenite.
    ready: BytesMut,
    /// Payload bytes of the current uncompressed frame still to pass through.
    passing: u64,
    /// The compressed message being gathered: its opcode and payload so far.
    message: Option<(u8, Vec<u8>)>,
    /// `--max-message-bytes`.
    limit: usize,
    /// `messages_inflated_total`.
    inflated: Counter,
}

impl Inflater {
    /// An inflater for messages of at most `limit` bytes once inflated,
    /// counting them in `inflated`.
    pub fn new(limit: usize, inflated: Counter) -> Inflater {
        Inflater {
            limit,
            inflated,
            ..Inflater::default()
        }
    }

    /// Takes bytes read from the socket.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), InflateError> {
        self.raw.extend_from_slice(bytes);
        self.process()
    }

    /// Moves bytes ready for tungstenite into `out`; how many (0: none wait).
    pub fn take_ready(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.ready.len());
        out[..n].copy_from_slice(&self.ready[..n]);
        self.ready.advance(n);
        if self.ready.is_empty() && self.ready.capacity() > 4096 {
            // An idle connection keeps no big buffer (thousands of them are).
            self.ready = BytesMut::new();
        }
        n
    }

    /// Whether bytes wait for tungstenite.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The socket ended: whatever was not a whole frame goes to tungstenite
    /// as it is (it reports the truncation).
    pub fn finish(&mut self) {
        let rest = self.raw.split();
        self.ready.extend_from_slice(&rest);
    }

    fn process(&mut self) -> Result<(), InflateError> {
        loop {
            if self.passing > 0 {
                let n = (self.passing.min(self.raw.len() as u64)) as usize;
                if n == 0 {
                    break;
                }
                self.ready.extend_from_slice(&self.raw[..n]);
                self.raw.advance(n);
                self.passing -= n as u64;
                continue;
            }
            let Some(head) = FrameHead::parse(&self.raw) else {
                break;
            };
            let compressed_start =
                head.rsv1 && head.opcode != OPCODE_CONTINUATION && !head.is_control();
            let continues_compressed =
                self.message.is_some() && head.opcode == OPCODE_CONTINUATION && !head.rsv1;
            if !(compressed_start || continues_compressed) || !head.masked {
                if self.message.is_some() && !head.is_control() {
                    // A new message (or a reserved bit) inside a compressed one.
                    return Err(InflateError::Corrupt);
                }
                // Not ours to change: tungstenite reads it (and refuses what
                // breaks the protocol, RSV1 on a control frame included).
                self.ready.extend_from_slice(&self.raw[..head.len]);
                self.raw.advance(head.len);
                self.passing = head.payload;
                continue;
            }
            let gathered = self.message.as_ref().map_or(0, |(_, p)| p.len() as u64);
            if gathered + head.payload > compressed_limit(self.limit) as u64 {
                return Err(InflateError::TooBig);
            }
            let whole = head.len + head.payload as usize;
            if self.raw.len() < whole {
                // Reserved now so the payload lands in one allocation.
                self.raw.reserve(whole - self.raw.len());
                break;
            }
            let (opcode, payload) = self
                .message
                .get_or_insert_with(|| (head.opcode, Vec::new()));
            let start = payload.len();
            payload.extend_from_slice(&self.raw[head.len..whole]);
            for (i, byte) in payload[start..].iter_mut().enumerate() {
                *byte ^= head.mask[i % 4];
            }
            let opcode = *opcode;
            self.raw.advance(whole);
            if head.fin {
                let (_, payload) = self.message.take().expect("gathered above");
                let inflated = inflate_message(&payload, self.limit)?;
                self.inflated.inc();
                self.emit(opcode, &inflated);
            }
        }
        if self.raw.is_empty() && self.raw.capacity() > 4096 {
            self.raw = BytesMut::new();
        }
        Ok(())
    }

    /// One final, masked (with a zero key) frame of `payload`.
    fn emit(&mut self, opcode: u8, payload: &[u8]) {
        self.ready.reserve(14 + payload.len());
        self.ready.extend_from_slice(&[0x80 | opcode]);
        let len = payload.len();
        if len < 126 {
            self.ready.extend_from_slice(&[0x80 | len as u8]);
        } else if len <= usize::from(u16::MAX) {
            self.ready.extend_from_slice(&[0x80 | 126]);
            self.ready.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.ready.extend_from_slice(&[0x80 | 127]);
            self.ready.extend_from_slice(&(len as u64).to_be_bytes());
        }
        self.ready.extend_from_slice(&[0, 0, 0, 0]);
        self.ready.extend_from_slice(payload);
    }
}

/// A frame's head (RFC 6455 §5.2).
struct FrameHead {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    masked: bool,
    mask: [u8; 4],
    /// Bytes of the head.
    len: usize,
    /// Bytes of the payload that follows.
    payload: u64,
}

impl FrameHead {
    /// The head at the start of `bytes`, once all of it has come.
    fn parse(bytes: &[u8]) -> Option<FrameHead> {
        let (&first, rest) = bytes.split_first()?;
        let (&second, rest) = rest.split_first()?;
        let masked = second & 0x80 != 0;
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
        let mut mask = [0; 4];
        if masked {
            mask.copy_from_slice(rest.get(..4)?);
        }
        let len = bytes.len() - rest.len() + if masked { 4 } else { 0 };
        Some(FrameHead {
            fin: first & 0x80 != 0,
            rsv1: first & 0x40 != 0,
            opcode: first & 0x0f,
            masked,
            mask,
            len,
            payload,
        })
    }

    fn is_control(&self) -> bool {
        self.opcode & OPCODE_CONTROL != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contract::deflate::deflate_message;

    /// A client frame: masked with a fixed key.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        out
    }

    fn drain(inflater: &mut Inflater) -> Vec<u8> {
        let mut out = Vec::new();
        let mut chunk = [0; 1000];
        loop {
            let n = inflater.take_ready(&mut chunk);
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&chunk[..n]);
        }
    }

    /// The frame tungstenite gets for an inflated message: zero mask.
    fn plain(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn compressed_messages_become_plain_frames_and_the_rest_passes_through() {
        let text = "{\"type\":\"shape_create\",\"text\":\"".to_owned() + &"雪".repeat(2000) + "\"}";
        let mut inflater = Inflater::new(65_536, Counter::default());
        let compressed = frame(0xc1, &deflate_message(text.as_bytes()));
        let uncompressed = frame(0x81, b"{\"type\":\"cursor_move\",\"x\":1,\"y\":2}");
        let ping = frame(0x89, b"hi");
        // Byte by byte: every split of a head or a payload is handled.
        for bytes in [&compressed, &uncompressed, &ping] {
            for byte in bytes.iter() {
                inflater.push(&[*byte]).unwrap();
            }
        }
        let mut expected = plain(0x1, text.as_bytes());
        expected.extend_from_slice(&uncompressed);
        expected.extend_from_slice(&ping);
        assert_eq!(drain(&mut inflater), expected);

        // Fragmented: RSV1 on the first frame only, a ping in between.
        let deflated = deflate_message(text.as_bytes());
        let (a, b) = deflated.split_at(deflated.len() / 2);
        let mut bytes = frame(0x41, a);
        bytes.extend(frame(0x89, b"p"));
        bytes.extend(frame(0x80, b));
        inflater.push(&bytes).unwrap();
        let mut expected = frame(0x89, b"p");
        expected.extend(plain(0x1, text.as_bytes()));
        assert_eq!(drain(&mut inflater), expected);
        assert!(inflater.raw.is_empty() && inflater.message.is_none());
    }

    #[test]
    fn a_message_that_inflates_past_the_limit_or_is_not_deflate_is_refused() {
        let bomb = frame(0xc1, &deflate_message(&vec![b' '; 1_000_000]));
        assert_eq!(
            Inflater::new(65_536, Counter::default()).push(&bomb),
            Err(InflateError::TooBig)
        );
        // Compressed bytes past the bound are refused before they are gathered.
        let mut head = vec![0xc1, 0x80 | 127];
        head.extend_from_slice(&(1u64 << 40).to_be_bytes());
        head.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            Inflater::new(65_536, Counter::default()).push(&head),
            Err(InflateError::TooBig)
        );
        let garbage = frame(0xc1, &[0xff; 40]);
        assert_eq!(
            Inflater::new(65_536, Counter::default()).push(&garbage),
            Err(InflateError::Corrupt)
        );
        // A text frame inside a compressed message.
        let mut bytes = frame(0x41, &deflate_message(b"abc"));
        bytes.extend(frame(0x81, b"x"));
        assert_eq!(
            Inflater::new(65_536, Counter::default()).push(&bytes),
            Err(InflateError::Corrupt)
        );
        // RSV1 on a control frame is tungstenite's to refuse: passed on as is.
        let mut inflater = Inflater::new(65_536, Counter::default());
        let ping = frame(0xc9, b"x");
        inflater.push(&ping).unwrap();
        assert_eq!(drain(&mut inflater), ping);
    }
}
