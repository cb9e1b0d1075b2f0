//! Why the server closes a client's connection: one type for the close
//! frame's code and text and the rejection it counts as, so a reason is never
//! matched back from its text.

use contract::ipc::JoinRejection;
use contract::protocol::{
    CLOSE_GOING_AWAY, CLOSE_INTERNAL_ERROR, CLOSE_POLICY, CLOSE_REPLACED, REASON_BOARD_UNREADABLE,
    REASON_RATE_LIMIT, REASON_REPLACED,
};

use crate::metrics::Rejection;

/// RFC 6455 §7.4.1: the client broke the protocol (unmasked or reserved frames,
/// a fragmented control frame…).
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// RFC 6455 §7.4.1: a text message that is not UTF-8, or compressed data that
/// does not inflate.
const CLOSE_INVALID_DATA: u16 = 1007;
/// WebSocket close code for a message over the size limit.
const CLOSE_TOO_BIG: u16 = 1009;

/// Why the server closes a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The server is stopping: `1001 Going Away`.
    GoingAway,
    /// The room's state is gone (its worker slot let it go): `1011`.
    RoomUnavailable,
    /// The room's worker failed and the room could not be rebuilt exactly
    /// (its journal had overflowed): `1011`.
    RoomLost,
    /// The room crashed its workers repeatedly and was closed alone: `1011`.
    RoomQuarantined,
    /// The room's stored board cannot be read: `1011`.
    BoardUnreadable,
    /// The worker refused the join (the room is full, or the user is in it
    /// and answers): `1008` with the reason the clients know.
    Rejected(JoinRejection),
    /// A newer connection of the same user took this silent one's place:
    /// `4000`.
    Replaced,
    /// The client kept sending far over its message budget: `1008`.
    RateLimit,
    /// A message over `--max-message-bytes` (inflated, if compressed): `1009`.
    TooBig,
    /// The client broke RFC 6455: `1002`.
    ProtocolError,
    /// A text message that is not UTF-8: `1007`.
    InvalidUtf8,
    /// Compressed data that does not inflate: `1007`.
    InvalidCompressed,
}

impl CloseReason {
    /// The close frame's code.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::GoingAway => CLOSE_GOING_AWAY,
            CloseReason::RoomUnavailable
            | CloseReason::RoomLost
            | CloseReason::RoomQuarantined
            | CloseReason::BoardUnreadable => CLOSE_INTERNAL_ERROR,
            CloseReason::Rejected(_) | CloseReason::RateLimit => CLOSE_POLICY,
            CloseReason::Replaced => CLOSE_REPLACED,
            CloseReason::TooBig => CLOSE_TOO_BIG,
            CloseReason::ProtocolError => CLOSE_PROTOCOL_ERROR,
            CloseReason::InvalidUtf8 | CloseReason::InvalidCompressed => CLOSE_INVALID_DATA,
        }
    }

    /// The close frame's text (the clients match some of them: PROTOCOL.md §2).
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::GoingAway => "Going Away",
            CloseReason::RoomUnavailable => "Room unavailable",
            CloseReason::RoomLost => "Room lost: its worker failed",
            CloseReason::RoomQuarantined => "Room closed: it repeatedly crashed the server",
            CloseReason::BoardUnreadable => REASON_BOARD_UNREADABLE,
            CloseReason::Rejected(why) => why.close_reason(),
            CloseReason::Replaced => REASON_REPLACED,
            CloseReason::RateLimit => REASON_RATE_LIMIT,
            CloseReason::TooBig => "Message too big",
            CloseReason::ProtocolError => "Protocol error",
            CloseReason::InvalidUtf8 => "Invalid UTF-8",
            CloseReason::InvalidCompressed => "Invalid compressed data",
        }
    }

    /// What it counts as in `connections_rejected_total`, if anything.
    pub fn rejection(self) -> Option<Rejection> {
        match self {
            CloseReason::Rejected(JoinRejection::RoomFull) => Some(Rejection::RoomFull),
            CloseReason::Rejected(JoinRejection::DuplicateUser) => Some(Rejection::DuplicateUser),
            CloseReason::RateLimit => Some(Rejection::RateLimit),
            CloseReason::TooBig => Some(Rejection::MessageTooBig),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts and codes the clients and the Node.js server's know.
    #[test]
    fn reasons_keep_the_codes_and_texts_clients_know() {
        let full = CloseReason::Rejected(JoinRejection::RoomFull);
        assert_eq!((full.code(), full.text()), (1008, "Room is full"));
        let duplicate = CloseReason::Rejected(JoinRejection::DuplicateUser);
        assert_eq!(
            (duplicate.code(), duplicate.text()),
            (1008, "Duplicate user")
        );
        assert_eq!(CloseReason::GoingAway.code(), 1001);
        assert_eq!(
            (CloseReason::Replaced.code(), CloseReason::Replaced.text()),
            (4000, "Replaced by a new connection")
        );
        assert_eq!(
            CloseReason::RateLimit.rejection(),
            Some(Rejection::RateLimit)
        );
        assert_eq!(CloseReason::TooBig.code(), 1009);
        assert_eq!(CloseReason::GoingAway.rejection(), None);
    }
}
