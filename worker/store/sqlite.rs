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
use contract::ipc::RoomId;

/// How long a write waits for another process's write to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle on the embedded store: one connection, used on the blocking pool,
/// and the identity the file must have (checked before every load and save).
pub struct SqliteStore {
    /// `None` until the file could be opened (a worker never creates it).
    conn: Arc<Mutex<Option<Connection>>>,
    path: PathBuf,
    /// (device, inode) the file must have; every load and save checks it first.
    identity: Arc<Mutex<Option<(u64, u64)>>>,
}

/// The (device, inode) of the file at `path`.
fn identity_of(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`, creating its folder: the
    /// server's first worker does this once at start-up.
    pub fn open(path: &Path) -> anyhow::Result<SqliteStore> {
        use anyhow::Context;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating data folder {}", dir.display()))?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("opening embedded store {}", path.display()))?;
        let opening = || format!("opening embedded store {}", path.display());
        conn.busy_timeout(BUSY_TIMEOUT).with_context(opening)?;
        // WAL: readers never block the writer; FULL: a committed save survives a
        // power cut, not just a crash of the process.
        conn.pragma_update(None, "journal_mode", "WAL")
            .with_context(opening)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .with_context(opening)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS boards (
                room_id TEXT PRIMARY KEY,
                shapes TEXT NOT NULL,
                updated_at_ms INTEGER NOT NULL
            )",
        )
        .with_context(|| format!("creating the schema in {}", path.display()))?;
        let identity = identity_of(path)
            .with_context(|| format!("reading embedded store {}", path.display()))?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(Some(conn))),
            path: path.to_owned(),
            identity: Arc::new(Mutex::new(Some(identity))),
        })
    }

    /// A worker's handle on the store the supervisor created: never creates the
    /// file (a deleted data folder must not turn into a fresh, empty database),
    /// and refuses a file other than `identity`. If the file cannot be opened
    /// now, every load and save fails (loudly, and is retried) until it can.
    pub fn attach(path: &Path, identity: Option<(u64, u64)>) -> SqliteStore {
        let store = SqliteStore {
            conn: Arc::new(Mutex::new(None)),
            path: path.to_owned(),
            identity: Arc::new(Mutex::new(identity)),
        };
        let mut conn = store.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = Self::connect(&store.path, &store.identity, &mut conn) {
            tracing::error!(error = %e, "embedded store unavailable; saves will fail until it is back");
        }
        drop(conn);
        store
    }

    /// The (device, inode) of the store's file, as checked before each use.
    pub fn identity(&self) -> Option<(u64, u64)> {
        *self.identity.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that `path` is still the file the store started with (and its
    /// folder writable), opening it without creating it if not open yet.
    fn connect(
        path: &Path,
        identity: &Mutex<Option<(u64, u64)>>,
        conn: &mut Option<Connection>,
    ) -> Result<(), StoreError> {
        let found = identity_of(path).map_err(|e| {
            StoreError::Gone(format!(
                "file {} is missing ({e}): was the data folder deleted? Nothing is written until it is back; restart the server to start a new store",
                path.display()
            ))
        })?;
        let mut expected = identity.lock().unwrap_or_else(|e| e.into_inner());
        match *expected {
            Some(want) if want != found => {
                return Err(StoreError::Gone(format!(
                    "file {} was replaced by another file since start-up; nothing is written into it (restart the server to use it)",
                    path.display()
                )));
            }
            Some(_) => {}
            None => *expected = Some(found),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && std::fs::metadata(dir).is_ok_and(|m| m.permissions().readonly())
        {
            return Err(StoreError::Gone(format!(
                "folder {} is not writable",
                dir.display()
            )));
        }
        if conn.is_none() {
            let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
                | rusqlite::OpenFlags::SQLITE_OPEN_URI;
            let opened = Connection::open_with_flags(path, flags)?;
            opened.busy_timeout(BUSY_TIMEOUT)?;
            opened.pragma_update(None, "synchronous", "FULL")?;
            *conn = Some(opened);
        }
        Ok(())
    }

    /// Runs `f` on the connection on the blocking pool, once the file is
    /// checked to be the store's own.
    fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let conn = self.conn.clone();
        let identity = self.identity.clone();
        let path = self.path.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = Self::connect(&path, &identity, &mut conn) {
                    tracing::error!(error = %e, "embedded store refused");
                    return Err(e);
                }
                f(conn.as_ref().expect("connected above"))
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
            // Anything but a JSON array of shapes is a broken row: an error for
            // the room, never an empty board that the next save would write over it.
            let shapes = match text {
                Some(text) => serde_json::from_str::<Vec<serde_json::Value>>(&text)
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
            let now_ms = contract::protocol::unix_time_ms();
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
            .as_ref()
            .unwrap()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_deleted_or_replaced_file_is_refused_and_never_recreated() {
        let dir = std::env::temp_dir().join(format!("ss-sqlite-{}", rand::random::<u64>()));
        let path = dir.join("boards.sqlite3");
        let created = SqliteStore::open(&path).unwrap();
        let identity = created.identity();
        let worker = SqliteStore::attach(&path, identity);
        let room = || RoomId("a".into());
        worker.save(room(), None, "[]".into()).await.unwrap();
        // A folder made read-only: refused, and fine again once writable.
        use std::os::unix::fs::PermissionsExt;
        let mode = |m| std::fs::Permissions::from_mode(m);
        std::fs::set_permissions(&dir, mode(0o555)).unwrap();
        let err = worker.save(room(), None, "[]".into()).await.unwrap_err();
        assert!(err.to_string().contains("not writable"), "{err}");
        std::fs::set_permissions(&dir, mode(0o755)).unwrap();
        worker.save(room(), None, "[]".into()).await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let err = worker.save(room(), None, "[]".into()).await.unwrap_err();
        assert!(matches!(err, StoreError::Gone(_)), "{err}");
        // A worker started now does not create a fresh database either.
        let late = SqliteStore::attach(&path, identity);
        assert!(late.load(room()).await.is_err());
        assert!(!path.exists());
        // A new file at the path is not the store the server started with.
        drop(SqliteStore::open(&path).unwrap());
        let err = worker.save(room(), None, "[]".into()).await.unwrap_err();
        assert!(matches!(err, StoreError::Gone(_)), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
