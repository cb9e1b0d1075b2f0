//! The HTTP backend (PROTOCOL.md §5): `GET /api/boards/by-room/{roomId}` and
//! `PUT /api/boards/{id}`, each with a bearer JWT signed with
//! `SESSION_SERVER_SECRET` and the claim `sessionServer: true`.

use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::StatusCode;
use serde_json::Value;

use super::{BoardId, BoardStore, LoadedBoard, SaveOutcome, StoreError};
use contract::ipc::RoomId;

/// A backend that does not accept a connection within this is treated as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Whole-request bound: a hung backend must not hold a save forever (the save is
/// retried instead).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Characters escaped in a path segment (RFC 3986 unreserved ones stay).
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A client of the backend: one connection pool, and a fresh bearer token
/// signed for each request.
pub struct HttpStore {
    client: reqwest::Client,
    base: String,
    key: EncodingKey,
}

impl HttpStore {
    /// A client of the backend at `base` (a trailing `/` dropped), signing
    /// with `secret`; fails only if the HTTP client cannot be built.
    pub fn new(base: &str, secret: &str) -> anyhow::Result<HttpStore> {
        // reqwest is built without a bundled crypto provider; use ring's.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()?;
        Ok(HttpStore {
            client,
            base: base.trim_end_matches('/').to_owned(),
            key: EncodingKey::from_secret(secret.as_bytes()),
        })
    }

    fn handle(&self) -> Handle {
        Handle {
            client: self.client.clone(),
            base: self.base.clone(),
            key: self.key.clone(),
        }
    }
}

/// What one request needs, owned, so the request can run as its own task.
struct Handle {
    client: reqwest::Client,
    base: String,
    key: EncodingKey,
}

#[derive(serde::Serialize)]
struct BackendClaims {
    #[serde(rename = "sessionServer")]
    session_server: bool,
    iat: u64,
}

impl Handle {
    fn bearer(&self) -> String {
        let claims = BackendClaims {
            session_server: true,
            iat: jsonwebtoken::get_current_timestamp(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .expect("HS256 signing cannot fail");
        format!("Bearer {token}")
    }

    async fn find(&self, room: &RoomId) -> Result<LoadedBoard, StoreError> {
        let url = format!(
            "{}/api/boards/by-room/{}",
            self.base,
            utf8_percent_encode(&room.0, PATH_SEGMENT)
        );
        let response = self
            .client
            .get(url)
            .header(reqwest::header::AUTHORIZATION, self.bearer())
            .send()
            .await?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(LoadedBoard::default()),
            status if status.is_success() => parse_board(&response.bytes().await?),
            status => Err(StoreError::Status {
                status: status.as_u16(),
                what: "the board lookup",
            }),
        }
    }

    async fn put(&self, board: &BoardId, shapes_json: String) -> Result<(), StoreError> {
        let url = format!(
            "{}/api/boards/{}",
            self.base,
            utf8_percent_encode(&board.0, PATH_SEGMENT)
        );
        let body = format!(r#"{{"data":{{"shapes":{shapes_json},"cursors":[]}}}}"#);
        let response = self
            .client
            .put(url)
            .header(reqwest::header::AUTHORIZATION, self.bearer())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(StoreError::Status {
                status: response.status().as_u16(),
                what: "the board save",
            })
        }
    }
}

/// Reads `{"id":…, "data":{"shapes":[…]}}`. `data` may also arrive as a JSON
/// string (some backends store it as text); a board without shapes is empty.
fn parse_board(body: &[u8]) -> Result<LoadedBoard, StoreError> {
    let board: Value =
        serde_json::from_slice(body).map_err(|e| StoreError::Malformed(e.to_string()))?;
    let id = match &board["id"] {
        Value::Number(n) => n.to_string(),
        Value::String(s) if !s.is_empty() => s.clone(),
        other => return Err(StoreError::Malformed(format!("board id {other}"))),
    };
    let data = match &board["data"] {
        Value::String(text) => {
            serde_json::from_str(text).map_err(|e| StoreError::Malformed(e.to_string()))?
        }
        data => data.clone(),
    };
    let shapes = match &data["shapes"] {
        Value::Array(shapes) => shapes.clone(),
        Value::Null => Vec::new(),
        other => return Err(StoreError::Malformed(format!("shapes {other}"))),
    };
    Ok(LoadedBoard {
        board: Some(BoardId(id)),
        shapes,
    })
}

impl BoardStore for HttpStore {
    fn load(&self, room: RoomId) -> BoxFuture<'static, Result<LoadedBoard, StoreError>> {
        let handle = self.handle();
        async move { handle.find(&room).await }.boxed()
    }

    fn save(
        &self,
        room: RoomId,
        board: Option<BoardId>,
        shapes_json: String,
    ) -> BoxFuture<'static, Result<SaveOutcome, StoreError>> {
        let handle = self.handle();
        async move {
            let board = match board {
                Some(board) => board,
                // No board at load time: it may have been created since.
                None => match handle.find(&room).await?.board {
                    Some(board) => board,
                    None => return Ok(SaveOutcome::NoBoard),
                },
            };
            handle.put(&board, shapes_json).await?;
            Ok(SaveOutcome::Saved { board })
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_boards_in_their_shapes() {
        let board = parse_board(
            br#"{"id":123,"name":"b","userId":"u","hathoraRoomId":"r","data":{"shapes":[{"id":"s"}],"cursors":[]},"createdAt":"x","updatedAt":"y"}"#,
        )
        .unwrap();
        assert_eq!(board.board, Some(BoardId("123".into())));
        assert_eq!(board.shapes, vec![serde_json::json!({"id":"s"})]);
        let as_text = parse_board(br#"{"id":"abc","data":"{\"shapes\":[]}"}"#).unwrap();
        assert_eq!(as_text.board, Some(BoardId("abc".into())));
        assert!(as_text.shapes.is_empty());
        let no_data = parse_board(br#"{"id":5,"data":null}"#).unwrap();
        assert!(no_data.shapes.is_empty());
        assert!(parse_board(br#"{"data":{}}"#).is_err());
        assert!(parse_board(br#"{"id":5,"data":{"shapes":3}}"#).is_err());
        assert!(parse_board(b"<html>").is_err());
    }

    #[test]
    fn room_ids_are_escaped_in_paths() {
        assert_eq!(
            utf8_percent_encode("a b/c?d", PATH_SEGMENT).to_string(),
            "a%20b%2Fc%3Fd"
        );
    }
}
