//! The embedded store: one SQLite file (WAL mode, full sync), one row per room
//! holding its shapes as JSON text. Several worker processes open it at once;
//! SQLite's locking serialises their writes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use rusqlite::{Connection, OptionalExtension, params};

use super::{BoardId, BoardStore, LoadedBoard, SaveOutcome, StoreError};
use crate::ipc::RoomId;

/// How long a write waits for another process's write to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`, creating its folder.
    pub fn open(path: &Path) -> anyhow::Result<SqliteStore> {
        use anyhow::Context;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating data folder {}", dir.display()))?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("opening embedded store {}", path.display()))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL: readers never block the writer; FULL: a committed save survives a
        // power cut, not just a crash of the process.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS boards (
                room_id TEXT PRIMARY KEY,
                shapes TEXT NOT NULL,
                updated_at_ms INTEGER NOT NULL
            )",
        )
        .with_context(|| format!("creating the schema in {}", path.display()))?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the connection on the blocking pool.
    fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let conn = self.conn.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                f(&conn)
            })
            .await?
        }
        .boxed()
    }
}

impl BoardStore for SqliteStore {
    fn load(&self, room: RoomId) -> BoxFuture<'static, Result<LoadedBoard, StoreError>> {
        self.with_conn(move |conn| {
            let text: Option<String> = conn
                .query_row(
                    "SELECT shapes FROM boards WHERE room_id = ?1",
                    params![room.0],
                    |row| row.get(0),
                )
                .optional()?;
            let shapes = match text {
                Some(text) => serde_json::from_str(&text)
                    .map_err(|e| StoreError::Malformed(format!("room {room}: {e}")))?,
                None => Vec::new(),
            };
            // Every room has a board here: saves never need a lookup.
            Ok(LoadedBoard {
                board: Some(BoardId(room.0)),
                shapes,
            })
        })
    }

    fn save(
        &self,
        room: RoomId,
        _board: Option<BoardId>,
        shapes_json: String,
    ) -> BoxFuture<'static, Result<SaveOutcome, StoreError>> {
        self.with_conn(move |conn| {
            let now_ms = crate::protocol::unix_time_ms();
            conn.execute(
                "INSERT INTO boards (room_id, shapes, updated_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(room_id) DO UPDATE SET shapes = excluded.shapes,
                                                    updated_at_ms = excluded.updated_at_ms",
                params![room.0, shapes_json, now_ms],
            )?;
            Ok(SaveOutcome::Saved {
                board: BoardId(room.0),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn saves_survive_reopening_and_rooms_are_separate() {
        let dir = std::env::temp_dir().join(format!("ss-sqlite-{}", rand::random::<u64>()));
        let path = dir.join("nested").join("boards.sqlite3");
        {
            let store = SqliteStore::open(&path).unwrap();
            let empty = store.load(RoomId("a".into())).await.unwrap();
            assert!(empty.shapes.is_empty());
            store
                .save(RoomId("a".into()), None, r#"[{"id":"1"}]"#.into())
                .await
                .unwrap();
            store
                .save(
                    RoomId("a".into()),
                    None,
                    r#"[{"id":"1"},{"id":"2"}]"#.into(),
                )
                .await
                .unwrap();
            store
                .save(RoomId("b".into()), None, r#"[{"id":"x"}]"#.into())
                .await
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let a = store.load(RoomId("a".into())).await.unwrap();
        assert_eq!(
            a.shapes,
            vec![serde_json::json!({"id":"1"}), serde_json::json!({"id":"2"})]
        );
        assert_eq!(a.board, Some(BoardId("a".into())));
        let b = store.load(RoomId("b".into())).await.unwrap();
        assert_eq!(b.shapes, vec![serde_json::json!({"id":"x"})]);
        let mode: String = store
            .conn
            .lock()
            .unwrap()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
