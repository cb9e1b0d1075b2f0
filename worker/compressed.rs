//! A room's snapshot compressed for members that negotiated permessage-deflate,
//! at the cost of what changed: the shapes are compressed in chunks that are
//! kept until one of their shapes changes, and only the members and cursors
//! (the part a cursor move changes) are compressed for every snapshot.
//!
//! The result is `contract::deflate` segments of the snapshot without its
//! opening `{` (see `FromWorker::Snapshot`): the head's segment, each chunk's,
//! then a stored `]}`. A chunk of 16–64 KiB loses little against compressing
//! the board whole (DEFLATE looks back 32 KiB at most), so a drag in a 4 MB
//! room compresses one chunk again instead of the board.
//!
//! Chunk boundaries depend on the shapes themselves, not on their positions:
//! a chunk ends at a shape whose revision hashes to a cut (once the chunk has
//! 16 KiB), or at 64 KiB. Deleting the board's first shape and drawing it
//! again (the red team's way to make every snapshot compress the whole
//! board) then changes the first and last chunks, not every chunk after the
//! first. Kept chunks are found by their shapes, wherever they now stand.

use std::collections::HashMap;

use contract::deflate::{Level, deflate_segment, stored_segment};

/// A chunk may end once its shapes' JSON reaches this…
const MIN_CHUNK_BYTES: usize = 16 * 1024;
/// …at a shape whose revision hashes to a cut (one in [`CUT_EVERY`])…
const CUT_EVERY: u64 = 8;
/// …and ends at this in any case.
const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// Whether a chunk past [`MIN_CHUNK_BYTES`] may end after the shape of `rev`.
fn is_cut(rev: u64) -> bool {
    // A multiplicative hash: revisions are consecutive numbers.
    rev.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32 & (CUT_EVERY - 1) == 0
}

/// One run of consecutive shapes, compressed.
struct Chunk {
    /// Its shapes' revisions, in order (a revision names one version of one
    /// shape; see `Room`): the chunk is right wherever the board has them.
    revs: Vec<u64>,
    /// It starts the board (its first shape has no comma before it).
    first: bool,
    /// The segment: its shapes' JSON, each after a comma but the board's
    /// first; `None` when that did not come out smaller than the JSON (random
    /// CJK text): the chunk is then sent as a stored segment, made from the
    /// shapes each time, and not kept twice.
    deflated: Option<Vec<u8>>,
}

/// The compressed chunks of a room's shapes, as of its last snapshot.
#[derive(Default)]
pub struct CompressedShapes {
    /// By the revision of their first shape.
    chunks: HashMap<u64, Chunk>,
}

impl CompressedShapes {
    /// Appends the segments of a snapshot whose JSON is `head` (everything
    /// before the shapes' first, from `"connectedUsers"` to `"shapes":[`),
    /// the shapes (`(revision, JSON)`, in order), then `]}`. Chunks whose
    /// shapes are unchanged are copied; the others are compressed and kept.
    /// Returns the bytes compressed (the work the snapshot cost).
    pub fn snapshot<'a>(
        &mut self,
        head: &str,
        shapes: impl ExactSizeIterator<Item = (u64, &'a str)>,
        out: &mut Vec<u8>,
    ) -> usize {
        deflate_segment(head.as_bytes(), Level::Fast, out);
        let mut compressed = head.len();
        let mut kept = std::mem::take(&mut self.chunks);
        // The chunk being gathered: its shapes' JSON (not copied until it
        // must be compressed) and revisions.
        let (mut jsons, mut revs, mut bytes) = (Vec::new(), Vec::new(), 0);
        let mut first = true;
        let count = shapes.len();
        for (index, (rev, json)) in shapes.enumerate() {
            jsons.push(json);
            revs.push(rev);
            bytes += json.len() + 1;
            let last = index + 1 == count;
            let cut = bytes >= MAX_CHUNK_BYTES || (bytes >= MIN_CHUNK_BYTES && is_cut(rev));
            if !(cut || last) {
                continue;
            }
            let found = kept
                .remove(&revs[0])
                .filter(|c| c.first == first && c.revs == revs);
            let chunk = match found {
                Some(chunk) => chunk,
                None => {
                    let text = chunk_text(&jsons, first, bytes);
                    compressed += text.len();
                    let mut deflated = Vec::new();
                    deflate_segment(text.as_bytes(), Level::Kept, &mut deflated);
                    deflated.shrink_to_fit();
                    Chunk {
                        revs: std::mem::take(&mut revs),
                        first,
                        deflated: (deflated.len() < text.len()).then_some(deflated),
                    }
                }
            };
            match &chunk.deflated {
                Some(deflated) => out.extend_from_slice(deflated),
                None => stored_segment(chunk_text(&jsons, first, bytes).as_bytes(), out),
            }
            self.chunks.insert(chunk.revs[0], chunk);
            (bytes, first) = (0, false);
            jsons.clear();
            revs.clear();
        }
        stored_segment(b"]}", out);
        compressed
    }

    /// Frees the chunks (no member takes compressed snapshots any more).
    pub fn clear(&mut self) {
        self.chunks = HashMap::new();
    }

    /// Chunks kept (for tests).
    #[cfg(test)]
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
}

/// A chunk's text: its shapes' JSON, each after a comma but the board's first.
fn chunk_text(jsons: &[&str], first: bool, bytes: usize) -> String {
    let mut text = String::with_capacity(bytes);
    for (i, json) in jsons.iter().enumerate() {
        if i > 0 || !first {
            text.push(',');
        }
        text.push_str(json);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use contract::deflate::{SYNC_TRAILER, inflate_message};

    fn shape(i: usize, rev: u64) -> String {
        format!(
            "{{\"id\":\"s{i}\",\"type\":\"text\",\"x\":{rev},\"y\":0,\"text\":\"{}\"}}",
            "文字".repeat(100)
        )
    }

    /// The snapshot the segments inflate to, with its `{` put back.
    fn inflate(segments: &[u8]) -> String {
        assert!(segments.ends_with(&SYNC_TRAILER));
        let payload = &segments[..segments.len() - SYNC_TRAILER.len()];
        let json = inflate_message(payload, 1 << 24).unwrap();
        format!("{{{}", String::from_utf8(json).unwrap())
    }

    fn iter(board: &[(u64, String)]) -> impl ExactSizeIterator<Item = (u64, &str)> {
        board.iter().map(|(r, j)| (*r, j.as_str()))
    }

    const HEAD: &str = "\"connectedUsers\":[\"a\"],\"cursors\":[],\"shapes\":[";

    fn expected(board: &[(u64, String)]) -> String {
        let shapes: Vec<&str> = board.iter().map(|(_, j)| j.as_str()).collect();
        format!("{{{HEAD}{}]}}", shapes.join(","))
    }

    /// A snapshot's segments and the bytes it compressed.
    fn snapshot(compressed: &mut CompressedShapes, board: &[(u64, String)]) -> (String, usize) {
        let mut out = Vec::new();
        let work = compressed.snapshot(HEAD, iter(board), &mut out);
        (inflate(&out), work)
    }

    #[test]
    fn only_the_chunks_whose_shapes_changed_are_compressed_again() {
        let mut board: Vec<(u64, String)> = (0..600).map(|i| (i as u64, shape(i, 0))).collect();
        let whole = expected(&board).len();
        let mut compressed = CompressedShapes::default();
        let (json, work) = snapshot(&mut compressed, &board);
        assert_eq!(json, expected(&board));
        assert!(work >= whole - 10, "all compressed once: {work} of {whole}");
        assert!(
            compressed.chunk_count() > 5,
            "{} chunks",
            compressed.chunk_count()
        );

        // A cursor moves: nothing but the head is compressed.
        let (json, work) = snapshot(&mut compressed, &board);
        assert_eq!(json, expected(&board));
        assert_eq!(work, HEAD.len());

        // One shape in the middle moves: its chunk alone is new.
        board[300] = (1000, shape(300, 1));
        let (json, work) = snapshot(&mut compressed, &board);
        assert_eq!(json, expected(&board));
        assert!(work <= HEAD.len() + MAX_CHUNK_BYTES, "{work}");

        // The first shape deleted and drawn again at the end, twice: the
        // first and last chunks change, not every one after the first.
        for rev in [1001, 1002] {
            let (_, old) = board.remove(0);
            board.push((rev, old));
            let (json, work) = snapshot(&mut compressed, &board);
            assert_eq!(json, expected(&board));
            assert!(
                work <= HEAD.len() + 3 * MAX_CHUNK_BYTES,
                "{work} of {whole}"
            );
        }
        board.clear();
        let (json, _) = snapshot(&mut compressed, &board);
        assert_eq!(json, expected(&board));
        assert_eq!(compressed.chunk_count(), 0);
    }

    /// Random CJK text compresses at the kept level (zlib-rs's level 1,
    /// with fixed Huffman codes, left it larger than it was).
    #[test]
    fn random_cjk_text_compresses() {
        let mut state = 12_345_u32;
        let random: String = (0..30_000)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                char::from_u32(0x4e00 + (state >> 8) % 20_000).unwrap()
            })
            .collect();
        let board = vec![(1, format!("{{\"id\":\"a\",\"text\":\"{random}\"}}"))];
        let mut compressed = CompressedShapes::default();
        let (json, _) = snapshot(&mut compressed, &board);
        assert_eq!(json, expected(&board));
        let chunk = compressed.chunks.values().next().unwrap();
        let size = chunk.deflated.as_ref().expect("compressed").len();
        assert!(
            size * 10 < board[0].1.len() * 8,
            "{size} of {}",
            board[0].1.len()
        );
    }

    /// A chunk that does not come out smaller is sent stored, and keeps no
    /// copy of its text.
    #[test]
    fn a_chunk_that_does_not_compress_is_sent_stored() {
        let board = vec![(1, "{}".to_owned())];
        let mut compressed = CompressedShapes::default();
        let (json, _) = snapshot(&mut compressed, &board);
        assert_eq!(json, expected(&board));
        assert!(compressed.chunks.values().all(|c| c.deflated.is_none()));
        let (json, work) = snapshot(&mut compressed, &board);
        assert_eq!(json, expected(&board));
        assert_eq!(work, HEAD.len(), "not compressed again");
    }
}
