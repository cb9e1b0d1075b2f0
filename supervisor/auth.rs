//! Client authentication: the JWT in `?token=` (PROTOCOL.md §1). Errors say why a
//! token was refused; neither they nor the logs ever contain the token.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use contract::ipc::RoomId;
use contract::protocol::MAX_ID_BYTES;

/// Clock skew tolerated on `exp` and `nbf`, between the backend that mints tokens
/// and this server.
const JWT_LEEWAY_SECS: u64 = 30;
/// Longest token accepted: real ones are a few hundred bytes; this bounds the
/// work an anonymous request can cause.
pub const MAX_TOKEN_BYTES: usize = 4096;

#[derive(Deserialize)]
struct Claims {
    #[serde(rename = "userId")]
    user_id: String,
    #[serde(rename = "roomId")]
    room_id: String,
    #[serde(default)]
    host: Option<String>,
    /// `true` in tokens minted by a dev-mode server's `/dev/token`.
    #[serde(default)]
    dev: Option<serde_json::Value>,
}

/// The claim `/dev/token` puts in the tokens it mints: a server not in dev
/// mode refuses them, so a dev secret reused in production opens nothing.
pub const DEV_CLAIM: &str = "dev";

/// Who a verified connection is, and which room it is for.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The token's `userId`: how the room's members know the user (in
    /// `connectedUsers` and on its cursor).
    pub user_id: String,
    /// The token's `roomId`: the only room this connection may join.
    pub room: RoomId,
}

/// Why a token was refused (answered with a 401 before the upgrade, and
/// counted by [`AuthError::reason`]).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `?token=`, or an empty one.
    #[error("no token in the query string")]
    MissingToken,
    /// The JWT itself failed: signature, algorithm, `exp`/`nbf`, or a claim
    /// missing or of the wrong type.
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    /// `userId` or `roomId` is the empty string.
    #[error("token has an empty userId or roomId")]
    EmptyClaim,
    /// `userId` or `roomId` is longer than the protocol allows for an id.
    #[error("token claim over {MAX_ID_BYTES} bytes")]
    ClaimTooLong,
    /// `.` or `..`: a path segment that URL normalisation would remove from the
    /// backend's board paths (`/api/boards/by-room/..` is `/api/boards/`).
    #[error("token's roomId is a relative path segment")]
    PathRoomId,
    /// Refused before decoding: longer than [`MAX_TOKEN_BYTES`].
    #[error("token over {MAX_TOKEN_BYTES} bytes")]
    TokenTooLarge,
    /// No `host` claim while `--require-host-claim` is on.
    #[error("token has no host claim")]
    MissingHostClaim,
    /// The `host` claim is not the request's `Host` header: the token was
    /// minted for another server.
    #[error("token was issued for another host")]
    HostMismatch,
    /// Minted by a dev-mode server (the [`DEV_CLAIM`]), and this server is not
    /// in dev mode.
    #[error("token was minted in dev mode")]
    DevToken,
}

impl AuthError {
    /// Label for metrics.
    pub fn reason(&self) -> &'static str {
        use jsonwebtoken::errors::ErrorKind;
        match self {
            AuthError::MissingToken => "missing_token",
            AuthError::Invalid(e) => match e.kind() {
                ErrorKind::InvalidSignature => "bad_signature",
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not_yet_valid",
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => "wrong_algorithm",
                _ => "malformed",
            },
            AuthError::EmptyClaim | AuthError::ClaimTooLong => "bad_claims",
            AuthError::PathRoomId => "bad_room_id",
            AuthError::TokenTooLarge => "too_large",
            AuthError::MissingHostClaim | AuthError::HostMismatch => "wrong_host",
            AuthError::DevToken => "dev_token",
        }
    }
}

/// Verifies client tokens: HS256 JWTs signed with `--jwt-secret`, the same
/// secret as the backend that mints them. One per server, in
/// [`Shared`](crate::Shared), used by every upgrade request.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    require_host_claim: bool,
    accept_dev_tokens: bool,
}

impl Authenticator {
    /// An authenticator for tokens signed with `secret`; `require_host_claim`
    /// refuses tokens without a `host` claim (a present one is always checked).
    pub fn new(secret: &str, require_host_claim: bool) -> Authenticator {
        // HS256 only: `none` and every other algorithm are refused by the header check.
        let mut validation = Validation::new(Algorithm::HS256);
        // The backend's tokens carry only `iat`; `exp`/`nbf` are checked when present.
        validation.required_spec_claims.clear();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = JWT_LEEWAY_SECS;
        Authenticator {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            require_host_claim,
            accept_dev_tokens: false,
        }
    }

    /// Whether tokens minted by `/dev/token` (the [`DEV_CLAIM`]) are accepted:
    /// only by a server in dev mode. Refused by default.
    pub fn accepting_dev_tokens(mut self, accept: bool) -> Authenticator {
        self.accept_dev_tokens = accept;
        self
    }

    /// Verifies `token` for a request that carried `host_header`: who the
    /// connection is and which room it may join, or why it may not.
    pub fn verify(
        &self,
        token: Option<&str>,
        host_header: Option<&str>,
    ) -> Result<Identity, AuthError> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::MissingToken)?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TokenTooLarge);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?.claims;
        if claims.user_id.is_empty() || claims.room_id.is_empty() {
            return Err(AuthError::EmptyClaim);
        }
        if claims.user_id.len() > MAX_ID_BYTES || claims.room_id.len() > MAX_ID_BYTES {
            return Err(AuthError::ClaimTooLong);
        }
        // Every other character of a room id is percent-encoded in the backend's
        // paths; these two segments would be resolved away instead.
        if claims.room_id == "." || claims.room_id == ".." {
            return Err(AuthError::PathRoomId);
        }
        if claims.dev == Some(serde_json::Value::Bool(true)) && !self.accept_dev_tokens {
            return Err(AuthError::DevToken);
        }
        match claims.host {
            Some(host) if Some(host.as_str()) != host_header => {
                return Err(AuthError::HostMismatch);
            }
            None if self.require_host_claim => return Err(AuthError::MissingHostClaim),
            _ => {}
        }
        Ok(Identity {
            user_id: claims.user_id,
            room: RoomId(claims.room_id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &str = "test-secret";

    fn token(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn accepts_backend_token_with_only_iat() {
        let auth = Authenticator::new(SECRET, true);
        let t = token(json!({"userId":"u1","roomId":"r1","host":"h:1","iat":now()}));
        assert_eq!(
            auth.verify(Some(&t), Some("h:1")).unwrap(),
            Identity {
                user_id: "u1".into(),
                room: RoomId("r1".into())
            }
        );
    }

    #[test]
    fn host_claim_rules() {
        let strict = Authenticator::new(SECRET, true);
        let lenient = Authenticator::new(SECRET, false);
        let no_host = token(json!({"userId":"u","roomId":"r"}));
        let other_host = token(json!({"userId":"u","roomId":"r","host":"evil:1"}));
        assert!(matches!(
            strict.verify(Some(&no_host), Some("h:1")),
            Err(AuthError::MissingHostClaim)
        ));
        assert!(lenient.verify(Some(&no_host), Some("h:1")).is_ok());
        assert!(matches!(
            lenient.verify(Some(&other_host), Some("h:1")),
            Err(AuthError::HostMismatch)
        ));
    }

    #[test]
    fn exp_and_nbf_are_enforced_when_present() {
        let auth = Authenticator::new(SECRET, false);
        let expired = token(json!({"userId":"u","roomId":"r","exp":now() - 3600}));
        let future = token(json!({"userId":"u","roomId":"r","nbf":now() + 3600}));
        let valid = token(json!({"userId":"u","roomId":"r","exp":now() + 3600,"nbf":now() - 10}));
        assert!(auth.verify(Some(&expired), None).is_err());
        assert!(auth.verify(Some(&future), None).is_err());
        assert!(auth.verify(Some(&valid), None).is_ok());
    }

    #[test]
    fn rejects_wrong_secret_alg_none_and_missing_claims() {
        let auth = Authenticator::new(SECRET, false);
        let wrong = encode(
            &Header::new(Algorithm::HS256),
            &json!({"userId":"u","roomId":"r"}),
            &EncodingKey::from_secret(b"other"),
        )
        .unwrap();
        assert!(auth.verify(Some(&wrong), None).is_err());
        // {"alg":"none","typ":"JWT"} . {"userId":"u","roomId":"r"} . (no signature)
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJ1c2VySWQiOiJ1Iiwicm9vbUlkIjoiciJ9.";
        assert!(auth.verify(Some(none), None).is_err());
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &json!({"userId":"u","roomId":"r"}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(auth.verify(Some(&hs512), None).is_err());
        assert!(
            auth.verify(Some(&token(json!({"roomId":"r"}))), None)
                .is_err()
        );
        assert!(matches!(
            auth.verify(Some(&token(json!({"userId":"","roomId":"r"}))), None),
            Err(AuthError::EmptyClaim)
        ));
        assert!(matches!(
            auth.verify(None, None),
            Err(AuthError::MissingToken)
        ));
    }

    #[test]
    fn oversize_tokens_and_claims_are_refused() {
        let auth = Authenticator::new(SECRET, false);
        let long = "u".repeat(MAX_ID_BYTES + 1);
        assert!(matches!(
            auth.verify(Some(&token(json!({"userId":long,"roomId":"r"}))), None),
            Err(AuthError::ClaimTooLong)
        ));
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(matches!(
            auth.verify(Some(&huge), None),
            Err(AuthError::TokenTooLarge)
        ));
    }

    #[test]
    fn failures_are_labelled_by_reason() {
        let auth = Authenticator::new(SECRET, true);
        let now = now();
        let reason = |t: &str| auth.verify(Some(t), Some("h:1")).unwrap_err().reason();
        let wrong = encode(
            &Header::new(Algorithm::HS256),
            &json!({"userId":"u","roomId":"r","host":"h:1"}),
            &EncodingKey::from_secret(b"other"),
        )
        .unwrap();
        assert_eq!(reason(&wrong), "bad_signature");
        assert_eq!(
            reason(&token(
                json!({"userId":"u","roomId":"r","host":"h:1","exp":now - 999})
            )),
            "expired"
        );
        assert_eq!(
            reason(&token(
                json!({"userId":"u","roomId":"r","host":"h:1","nbf":now + 999})
            )),
            "not_yet_valid"
        );
        assert_eq!(
            reason(&token(json!({"userId":"u","roomId":"r","host":"x:1"}))),
            "wrong_host"
        );
        assert_eq!(
            reason(&token(json!({"roomId":"r","host":"h:1"}))),
            "malformed"
        );
        assert_eq!(
            reason(&token(json!({"userId":"","roomId":"r","host":"h:1"}))),
            "bad_claims"
        );
        assert_eq!(reason("not.a.jwt"), "malformed");
    }
}
