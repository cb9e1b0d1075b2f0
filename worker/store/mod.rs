//! Board persistence: one trait, two stores. The HTTP backend of PROTOCOL.md §5
//! when `BACKEND_URL` is set, the embedded SQLite store otherwise.

pub mod fallback;
pub mod http;
pub mod sqlite;

use std::sync::Arc;

use futures_util::future::BoxFuture;

use contract::config::{FileIdentity, StoreConfig};
use contract::ipc::RoomId;

/// How the store names a board (the backend's board id; the room id in the
/// embedded store). Kept from the load so saves need no lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoardId(pub String);

/// A board as read from the store.
#[derive(Debug, Default, PartialEq)]
pub struct LoadedBoard {
    /// `None`: no board exists for the room (start empty).
    pub board: Option<BoardId>,
    /// The stored shapes, in order, as JSON objects.
    pub shapes: Vec<serde_json::Value>,
}

/// What a save did.
#[derive(Debug, PartialEq)]
pub enum SaveOutcome {
    /// The shapes are in the store.
    Saved {
        /// The board written, kept for the room's next saves.
        board: BoardId,
    },
    /// There is still no board for the room: nothing was written.
    NoBoard,
}

/// Why a load or a save failed. The worker retries every kind but
/// [`Malformed`](Self::Malformed), which no retry can fix.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached, or did not answer in time.
    #[error("backend request failed: {0}")]
    Request(#[from] reqwest::Error),
    /// The backend answered with an error status.
    #[error("backend answered {status} to {what}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The request: `the board lookup` or `the board save`.
        what: &'static str,
    },
    /// The stored board is not a list of shapes (what is wrong with it).
    #[error("backend sent a malformed board: {0}")]
    Malformed(String),
    /// The embedded store's database failed.
    #[error("embedded store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The embedded store's blocking task did not finish (it panicked, or the
    /// runtime stopped).
    #[error("embedded store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The embedded store's file is not the one the server started with (its
    /// folder was deleted, or the file removed or replaced): writing would go
    /// into a deleted file or a fresh database, so nothing is written.
    #[error("embedded store {0}")]
    Gone(String),
}

impl StoreError {
    /// The stored board exists but cannot be parsed: retrying will not help,
    /// and starting empty would overwrite it.
    pub fn is_malformed(&self) -> bool {
        matches!(self, StoreError::Malformed(_))
    }
}

/// A place boards are loaded from and saved to. Futures are `'static` so a
/// worker can run them as tasks beside its frame loop.
pub trait BoardStore: Send + Sync {
    /// Reads the room's board: its id and shapes, or no board (start empty).
    /// A board that cannot be parsed is [`StoreError::Malformed`], never empty.
    fn load(&self, room: RoomId) -> BoxFuture<'static, Result<LoadedBoard, StoreError>>;

    /// Writes `shapes_json` (a JSON array) as the room's shapes. `board` is the id
    /// from the load, or `None` if there was no board then (look again).
    fn save(
        &self,
        room: RoomId,
        board: Option<BoardId>,
        shapes_json: String,
    ) -> BoxFuture<'static, Result<SaveOutcome, StoreError>>;
}

/// Opens the configured store: the worker's answer to its settings. The
/// embedded store's file is created by the server's first worker (`identity`
/// is `None` then; an error here stops the server's start), and every later
/// worker must find that same file (it never creates one). Returns the store
/// and the embedded file's identity.
pub fn open(
    config: &StoreConfig,
    identity: Option<FileIdentity>,
) -> anyhow::Result<(Arc<dyn BoardStore>, Option<FileIdentity>)> {
    Ok(match (config, identity) {
        (StoreConfig::Backend { url, secret }, _) => {
            (Arc::new(http::HttpStore::new(url, &secret.0)?), None)
        }
        (StoreConfig::Embedded { path }, None) => {
            let store = sqlite::SqliteStore::open(path)?;
            let identity = store.identity();
            (Arc::new(store), identity)
        }
        (StoreConfig::Embedded { path }, Some(identity)) => (
            Arc::new(sqlite::SqliteStore::attach(path, Some(identity))),
            Some(identity),
        ),
    })
}
