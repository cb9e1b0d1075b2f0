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

/// Why a client's compressed input was refused; the session closes with the
/// code it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateFailure {
    /// Too big once inflated (1009), or not DEFLATE data (1007).
    #[error(transparent)]
    Inflate(#[from] InflateError),
    /// A compressed message's frames break RFC 6455 or 7692 (1002).
    #[error("a compressed message's frames break the WebSocket protocol")]
    Protocol,
}

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

    /// Takes bytes read from the socket (call only once `process` has
    /// left nothing ready: it then needs more bytes).
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), InflateFailure> {
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

    /// Moves what it can from `raw` to `ready`, but never more than one
    /// inflated message ahead of tungstenite: a client's tiny compressed
    /// frames must not inflate into megabytes before its session has read
    /// the first (backpressure reaches compressed input as it does plain).
    pub fn process(&mut self) -> Result<(), InflateFailure> {
        while self.ready.is_empty() {
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
            if !head.masked {
                return Err(InflateFailure::Protocol); // RFC 6455 §5.1
            }
            let compressed_start =
                head.rsv1 && head.opcode != OPCODE_CONTINUATION && !head.is_control();
            let in_message = self.message.is_some();
            if in_message && !head.is_control() {
                // Only continuations, without RSV1, may follow the first
                // frame of a compressed message (RFC 7692 §6.1).
                if head.opcode != OPCODE_CONTINUATION || head.rsv1 {
                    return Err(InflateFailure::Protocol);
                }
            } else if !compressed_start {
                // Not ours to change: tungstenite reads it (and refuses what
                // breaks the protocol, RSV1 on a control frame included).
                self.ready.extend_from_slice(&self.raw[..head.len]);
                self.raw.advance(head.len);
                self.passing = head.payload;
                continue;
            }
            if head.rsv23 {
                return Err(InflateFailure::Protocol); // no extension uses them
            }
            let gathered = self.message.as_ref().map_or(0, |(_, p)| p.len() as u64);
            if gathered + head.payload > compressed_limit(self.limit) as u64 {
                return Err(InflateError::TooBig.into());
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
    /// RSV2 or RSV3: no extension here uses them.
    rsv23: bool,
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
            rsv23: first & 0x30 != 0,
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
                inflater.process().unwrap();
                if !inflater.has_ready() {
                    return out;
                }
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

    /// Tiny compressed frames that each inflate to 64 KiB: a socket read of
    /// many of them inflates one, not all (the red team's 47 per 4 KiB read
    /// held 3 MiB per connection).
    #[test]
    fn at_most_one_message_is_inflated_ahead_of_tungstenite() {
        let big = format!(
            r#"{{"type":"cursor_move","x":1,"y":1,"pad":"{}"}}"#,
            " ".repeat(65_000)
        );
        let one = frame(0xc1, &deflate_message(big.as_bytes()));
        assert!(one.len() < 1000, "{}", one.len());
        let mut inflater = Inflater::new(65_536, Counter::default());
        inflater.push(&one.repeat(40)).unwrap();
        assert!(
            inflater.ready.len() < 65_600,
            "{} ready",
            inflater.ready.len()
        );
        let mut taken = vec![0; 70_000];
        let mut messages = 0;
        loop {
            let n = inflater.take_ready(&mut taken);
            if n == 0 {
                inflater.process().unwrap();
                if !inflater.has_ready() {
                    break;
                }
                continue;
            }
            messages += 1;
            assert!(inflater.ready.len() < 65_600);
        }
        assert_eq!(messages, 40, "every message, one at a time");
    }

    #[test]
    fn a_message_that_inflates_past_the_limit_or_is_not_deflate_is_refused() {
        let bomb = frame(0xc1, &deflate_message(&vec![b' '; 1_000_000]));
        assert_eq!(
            Inflater::new(65_536, Counter::default()).push(&bomb),
            Err(InflateError::TooBig.into())
        );
        // Compressed bytes past the bound are refused before they are gathered.
        let mut head = vec![0xc1, 0x80 | 127];
        head.extend_from_slice(&(1u64 << 40).to_be_bytes());
        head.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            Inflater::new(65_536, Counter::default()).push(&head),
            Err(InflateError::TooBig.into())
        );
        let garbage = frame(0xc1, &[0xff; 40]);
        assert_eq!(
            Inflater::new(65_536, Counter::default()).push(&garbage),
            Err(InflateError::Corrupt.into())
        );
        // Framing a compressed message may not have: a new message (plain
        // or compressed) before its end, RSV1 on its continuation, RSV2 or
        // RSV3, an unmasked frame.
        let start = frame(0x41, &deflate_message(b"abc"));
        for next in [
            frame(0x81, b"x"),
            frame(0xc1, &deflate_message(b"y")),
            frame(0xc0, b"z"),
        ] {
            let mut bytes = start.clone();
            bytes.extend(next);
            assert_eq!(
                Inflater::new(65_536, Counter::default()).push(&bytes),
                Err(InflateFailure::Protocol)
            );
        }
        for first in [0xe1, 0xd1] {
            assert_eq!(
                Inflater::new(65_536, Counter::default())
                    .push(&frame(first, &deflate_message(b"a"))),
                Err(InflateFailure::Protocol),
                "{first:#x}"
            );
        }
        let mut unmasked = vec![0xc1, 3];
        unmasked.extend_from_slice(b"abc");
        assert_eq!(
            Inflater::new(65_536, Counter::default()).push(&unmasked),
            Err(InflateFailure::Protocol)
        );
        // RSV1 on a control frame is tungstenite's to refuse: passed on as is.
        let mut inflater = Inflater::new(65_536, Counter::default());
        let ping = frame(0xc9, b"x");
        inflater.push(&ping).unwrap();
        assert_eq!(drain(&mut inflater), ping);
    }
}
