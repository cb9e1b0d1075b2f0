//! permessage-deflate (RFC 7692) payloads as pure functions: the worker
//! compresses a snapshot once for every member of its room, the supervisor
//! adds each member's few bytes of prefix and inflates what clients send.
//!
//! Both directions are negotiated without context takeover, so every message
//! is a DEFLATE stream of its own. Such a stream may be built from *segments*:
//! runs of DEFLATE blocks that end on a byte boundary with a sync flush (the
//! four bytes [`SYNC_TRAILER`]) and never set the final bit. Segments made
//! separately concatenate into one valid stream, so a snapshot's shapes are
//! compressed once and kept until they change, its members and cursors are
//! compressed per version, and a v2 message's own prefix is a stored segment
//! that needs no compressor at all. A message's payload is its segments with
//! the last trailer taken off (RFC 7692 §7.2.1); the receiver puts it back.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Snapshots shorter than this go uncompressed (RSV1 is per message): a
/// room of ten cursors and no shapes (840 bytes) cost the server 12 % more
/// CPU per delivery compressed, for 500 bytes saved per message; any board
/// with shapes is past it. Node's `ws` compresses from the same size.
pub const MIN_COMPRESSED_SNAPSHOT_BYTES: usize = 1024;

/// A v2 `ops` message is compressed from this size: a busy room's batch of
/// cursor ops (~370 bytes) then comes to about 160.
pub const MIN_COMPRESSED_OPS_BYTES: usize = 256;

/// How hard a segment is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Level 1, for what is compressed for every message (a snapshot's
    /// members and cursors, a v2 member's ops): 744 bytes of cursors in
    /// 4.3 µs, most of it the compressor's reset.
    Fast,
    /// Level 2, for what is compressed once and kept (a board's chunks):
    /// dynamic Huffman codes, where zlib-rs's level 1 uses fixed ones that
    /// leave CJK and emoji text nearly as it was (random CJK: 103 % at
    /// level 1, 73 % at level 2; 200 shapes: 15 % and 9.5 %), for twice
    /// the time.
    Kept,
}

/// How a segment ends (the last four bytes of an empty stored block), and
/// what RFC 7692 has the sender take off a message's end and the receiver
/// put back.
pub const SYNC_TRAILER: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

thread_local! {
    /// One compressor per level and thread, reset between segments: making
    /// one allocates a few hundred KiB of tables.
    static FAST: RefCell<Compress> = RefCell::new(Compress::new(Compression::new(1), false));
    static KEPT: RefCell<Compress> = RefCell::new(Compress::new(Compression::new(2), false));
    /// One decompressor per thread, reset between messages.
    static DECOMPRESSOR: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Appends `input` compressed as one segment (fresh history, sync-flushed).
pub fn deflate_segment(input: &[u8], level: Level, out: &mut Vec<u8>) {
    let compressor = match level {
        Level::Fast => &FAST,
        Level::Kept => &KEPT,
    };
    compressor.with_borrow_mut(|compressor| {
        compressor.reset();
        let mut consumed = 0;
        loop {
            // Deflate at level 1 rarely grows text; the loop covers the rest.
            out.reserve(input.len() / 2 + 64);
            let before = compressor.total_in();
            compressor
                .compress_vec(&input[consumed..], out, FlushCompress::Sync)
                .expect("compressing memory to memory cannot fail");
            consumed += (compressor.total_in() - before) as usize;
            // Done once the input is in and the flush left room to spare.
            if consumed == input.len() && out.len() < out.capacity() {
                break;
            }
        }
    });
    debug_assert!(out.ends_with(&SYNC_TRAILER));
}

/// Appends `input` as a stored (uncompressed) segment: 5 bytes of header per
/// 64 KiB, no compressor. For a short prefix before compressed segments.
pub fn stored_segment(input: &[u8], out: &mut Vec<u8>) {
    for chunk in input.chunks(usize::from(u16::MAX)) {
        let len = chunk.len() as u16;
        // BFINAL 0, BTYPE 00, padded to the byte (the segment before ended on one).
        out.push(0x00);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    // An empty stored block, as a sync flush ends: its header byte (the
    // stream is on a byte boundary here), then the trailer.
    out.push(0x00);
    out.extend_from_slice(&SYNC_TRAILER);
}

/// A whole message's payload: `input` as one segment (at [`Level::Fast`]),
/// its trailer off.
pub fn deflate_message(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    deflate_segment(input, Level::Fast, &mut out);
    out.truncate(out.len() - SYNC_TRAILER.len());
    out
}

/// Why a client's compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates past the message limit (a zip bomb, or just too big).
    #[error("compressed message inflates past the message limit")]
    TooBig,
    /// It is not a DEFLATE stream.
    #[error("compressed message is not valid DEFLATE data")]
    Corrupt,
}

/// Inflates one message's payload (the trailer put back), to at most `limit`
/// bytes: the output never grows past `limit + 1`, whatever the input claims.
pub fn inflate_message(payload: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    DECOMPRESSOR.with_borrow_mut(|inflater| {
        inflater.reset(false);
        let cap = limit.saturating_add(1);
        let mut out = Vec::with_capacity(payload.len().saturating_mul(4).clamp(64, cap));
        for input in [payload, &SYNC_TRAILER[..]] {
            let mut consumed = 0;
            loop {
                if out.len() == out.capacity() {
                    if out.len() >= cap {
                        return Err(InflateError::TooBig);
                    }
                    out.reserve_exact(out.capacity().min(cap - out.len()));
                }
                let (in_before, out_before) = (inflater.total_in(), out.len());
                let status = inflater
                    .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                consumed += (inflater.total_in() - in_before) as usize;
                if out.len() > limit {
                    return Err(InflateError::TooBig);
                }
                if status == Status::StreamEnd {
                    // A final block ends the message (allowed; rarely sent),
                    // and nothing but the trailer may follow it.
                    return if input.len() == SYNC_TRAILER.len() || consumed == input.len() {
                        Ok(out)
                    } else {
                        Err(InflateError::Corrupt)
                    };
                }
                let stalled = consumed == input.len() && out.len() < out.capacity();
                let no_progress = inflater.total_in() == in_before && out.len() == out_before;
                if stalled {
                    break;
                }
                if no_progress && out.len() < out.capacity() {
                    return Err(InflateError::Corrupt);
                }
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_like(shapes: usize) -> String {
        let mut s = String::from("{\"connectedUsers\":[\"a\"],\"cursors\":[],\"shapes\":[");
        for i in 0..shapes {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&format!(
                "{{\"id\":\"s{i}\",\"type\":\"rectangle\",\"x\":{i},\"y\":{},\"width\":150,\"height\":100,\"userId\":\"user{}\",\"timestamp\":\"2026-12-07T05:00:00.000Z\",\"fill\":\"#3b82f6\",\"stroke\":\"#1d4ed8\",\"rotation\":0}}",
                i * 3,
                i % 7
            ));
        }
        s.push_str("]}");
        s
    }

    #[test]
    fn a_message_inflates_to_its_input_and_is_much_smaller() {
        let json = snapshot_like(200);
        let payload = deflate_message(json.as_bytes());
        assert!(
            payload.len() * 8 < json.len(),
            "{} -> {}",
            json.len(),
            payload.len()
        );
        assert_eq!(
            inflate_message(&payload, json.len()).unwrap(),
            json.as_bytes()
        );
    }

    #[test]
    fn segments_made_apart_concatenate_into_one_message() {
        let json = snapshot_like(50);
        let (head, tail) = json.split_at(40);
        let mut payload = Vec::new();
        stored_segment(b"{\"type\":\"snapshot\",\"seq\":7,", &mut payload);
        deflate_segment(&head.as_bytes()[1..], Level::Fast, &mut payload);
        deflate_segment(tail.as_bytes(), Level::Kept, &mut payload);
        assert!(payload.ends_with(&SYNC_TRAILER));
        payload.truncate(payload.len() - 4);
        let mut expected = b"{\"type\":\"snapshot\",\"seq\":7,".to_vec();
        expected.extend_from_slice(&json.as_bytes()[1..]);
        assert_eq!(inflate_message(&payload, 1 << 20).unwrap(), expected);
        // A stored segment longer than one stored block.
        let long = vec![b'x'; 70_000];
        let mut payload = Vec::new();
        stored_segment(&long, &mut payload);
        payload.truncate(payload.len() - 4);
        assert_eq!(inflate_message(&payload, 1 << 20).unwrap(), long);
    }

    #[test]
    fn inflating_stops_at_the_limit_and_refuses_garbage() {
        // 5 MB of one byte deflates to under 64 KiB at level 1: a zip bomb in one message.
        let bomb = deflate_message(&vec![b'a'; 5_000_000]);
        assert!(bomb.len() < 65_536, "{}", bomb.len());
        assert_eq!(inflate_message(&bomb, 65_536), Err(InflateError::TooBig));
        let exact = deflate_message(&vec![b'a'; 65_536]);
        assert_eq!(inflate_message(&exact, 65_536).unwrap().len(), 65_536);
        assert_eq!(
            inflate_message(&exact, 65_535),
            Err(InflateError::TooBig),
            "one byte over"
        );
        assert_eq!(
            inflate_message(&[0xff, 0xff, 0xff, 0x00, 0x12], 1000),
            Err(InflateError::Corrupt)
        );
        // The compressor and decompressor are reused: the next message is fine.
        let ok = deflate_message(b"{\"type\":\"cursor_move\",\"x\":1,\"y\":2}");
        assert_eq!(
            inflate_message(&ok, 1000).unwrap(),
            b"{\"type\":\"cursor_move\",\"x\":1,\"y\":2}"
        );
        assert_eq!(inflate_message(&[], 1000).unwrap(), b"", "an empty message");
    }
}
