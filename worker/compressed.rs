//! A room's snapshot compressed for members that negotiated permessage-deflate,
//! at the cost of what changed: the shapes are compressed in chunks that are
//! kept until one of their shapes changes, and only the members and cursors
//! (the part a cursor move changes) are compressed for every snapshot.
//!
//! The result is `contract::deflate` segments of the snapshot without its
//! opening `{` (see `FromWorker::Snapshot`): the head's segment, each chunk's,
//! then a stored `]}`. A chunk of about [`CHUNK_BYTES`] loses little against
//! compressing the board whole (DEFLATE looks back 32 KiB at most), so a drag
//! in a 4 MB room recompresses one chunk instead of the board.

use contract::deflate::{deflate_segment, stored_segment};

/// A chunk closes once its shapes' JSON reaches this: DEFLATE's window, so a
/// chunk compresses as well as the board would.
const CHUNK_BYTES: usize = 32 * 1024;

/// One run of consecutive shapes, compressed.
struct Chunk {
    /// Index of its first shape on the board.
    start: usize,
    /// Its shapes' revisions, in order: the chunk is still right while the
    /// board has the same revisions from `start` on (a revision names one
    /// version of one shape; see `Room`).
    revs: Vec<u64>,
    /// The segment: its shapes' JSON, each after a comma but the board's first.
    deflated: Vec<u8>,
}

/// The compressed chunks of a room's shapes, as of its last snapshot.
#[derive(Default)]
pub struct CompressedShapes {
    /// By `start`, ascending.
    chunks: Vec<Chunk>,
}

impl CompressedShapes {
    /// Appends the segments of a snapshot whose JSON is `head` (everything
    /// before the shapes' first, from `"connectedUsers"` to `"shapes":[`),
    /// the shapes (`(revision, JSON)`, in order), then `]}`. Chunks whose
    /// shapes are unchanged are copied; the others are compressed and kept.
    pub fn snapshot<'a>(
        &mut self,
        head: &str,
        shapes: impl ExactSizeIterator<Item = (u64, &'a str)>,
        out: &mut Vec<u8>,
    ) {
        deflate_segment(head.as_bytes(), out);
        let mut kept = std::mem::take(&mut self.chunks).into_iter().peekable();
        // The chunk being gathered: its shapes' JSON (not copied until it
        // must be compressed) and revisions.
        let (mut jsons, mut revs, mut bytes) = (Vec::new(), Vec::new(), 0);
        let mut start = 0;
        let count = shapes.len();
        for (index, (rev, json)) in shapes.enumerate() {
            jsons.push(json);
            revs.push(rev);
            bytes += json.len() + 1;
            if bytes < CHUNK_BYTES && index + 1 < count {
                continue;
            }
            // A chunk ends here: the kept one that starts where it does, if
            // it has the same shapes, else a new one.
            while kept.next_if(|c| c.start < start).is_some() {}
            let chunk = match kept.next_if(|c| c.start == start && c.revs == revs) {
                Some(chunk) => chunk,
                None => {
                    let mut text = String::with_capacity(bytes);
                    for (i, json) in jsons.iter().enumerate() {
                        if start + i > 0 {
                            text.push(',');
                        }
                        text.push_str(json);
                    }
                    let mut deflated = Vec::new();
                    deflate_segment(text.as_bytes(), &mut deflated);
                    deflated.shrink_to_fit();
                    Chunk {
                        start,
                        revs: std::mem::take(&mut revs),
                        deflated,
                    }
                }
            };
            out.extend_from_slice(&chunk.deflated);
            self.chunks.push(chunk);
            (bytes, start) = (0, index + 1);
            jsons.clear();
            revs.clear();
        }
        stored_segment(b"]}", out);
    }

    /// Frees the chunks (no member takes compressed snapshots any more).
    pub fn clear(&mut self) {
        self.chunks = Vec::new();
    }

    /// Chunks kept (for tests).
    #[cfg(test)]
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
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

    #[test]
    fn only_the_chunks_whose_shapes_changed_are_compressed_again() {
        let mut board: Vec<(u64, String)> = (0..300).map(|i| (i as u64, shape(i, 0))).collect();
        let head = "\"connectedUsers\":[\"a\"],\"cursors\":[],\"shapes\":[";
        let expected = |board: &[(u64, String)]| {
            let shapes: Vec<&str> = board.iter().map(|(_, j)| j.as_str()).collect();
            format!("{{{head}{}]}}", shapes.join(","))
        };
        let mut compressed = CompressedShapes::default();
        let mut out = Vec::new();
        fn iter(board: &[(u64, String)]) -> impl ExactSizeIterator<Item = (u64, &str)> {
            board.iter().map(|(r, j)| (*r, j.as_str()))
        }
        compressed.snapshot(head, iter(&board), &mut out);
        assert_eq!(inflate(&out), expected(&board));
        let chunks = compressed.chunk_count();
        assert!(chunks > 3, "{chunks} chunks");
        let first = compressed.chunks[0].deflated.as_ptr();
        let last = compressed.chunks[chunks - 1].deflated.as_ptr();

        // One shape in the middle moves: its chunk alone is new.
        board[150] = (1000, shape(150, 1));
        out.clear();
        compressed.snapshot(head, iter(&board), &mut out);
        assert_eq!(inflate(&out), expected(&board));
        assert_eq!(compressed.chunks[0].deflated.as_ptr(), first);
        assert_eq!(compressed.chunks[chunks - 1].deflated.as_ptr(), last);

        // Created at the end, deleted at the start, cleared: always the board.
        board.push((1001, shape(300, 0)));
        board.remove(0);
        out.clear();
        compressed.snapshot(head, iter(&board), &mut out);
        assert_eq!(inflate(&out), expected(&board));
        board.clear();
        out.clear();
        compressed.snapshot(head, iter(&board), &mut out);
        assert_eq!(inflate(&out), expected(&board));
        assert_eq!(compressed.chunk_count(), 0);
    }
}
