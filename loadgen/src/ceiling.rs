//! The physical ceiling (issue 5): a minimal single-threaded fan-out server that
//! speaks just enough WebSocket for the load generator's clients. It accepts the
//! same connections, and for every client message writes the same kind of
//! snapshot (same JSON shape and size, assembled by byte copying from the
//! cursor's raw `x`/`y`) to every member of the room, one `write` each. No JSON
//! parsing of messages, no routing beyond a room map, no IPC, no validation. It
//! tells what the kernel and the network stack cost on this machine.
//!
//! With `--hop`, every client message goes through a second process and back
//! before it is applied (the peer sends it straight back; see [`peer`]): the
//! floor of any design whose rooms live in another process than the sockets,
//! as the session server's workers do.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Member {
    user: String,
    socket: Rc<TcpStream>,
    /// Bytes of a frame the socket did not take at once; newer frames are
    /// skipped for this member until it drains (newest-state semantics).
    pending: Vec<u8>,
}

#[derive(Default)]
struct Room {
    members: Vec<Member>,
    /// user → raw `"x":…,"y":…` bytes, in first-move order.
    cursors: Vec<(String, Vec<u8>)>,
    /// Each shape's JSON, assembled once when it is created.
    shapes: Vec<Vec<u8>>,
}

/// Shapes per room, as in the server.
const MAX_SHAPES: usize = 1000;

type Rooms = Rc<RefCell<HashMap<String, Room>>>;

/// `--hop`: the socket to the peer process, and what it did not take yet.
struct Hop {
    socket: tokio::net::UnixStream,
    /// Encoded messages the socket did not take at once (the flusher writes
    /// them once it can).
    pending: RefCell<Vec<u8>>,
    flush: tokio::sync::Notify,
}

impl Hop {
    /// Starts the peer process (this binary, `ceiling-peer`) on one end of a
    /// socket pair; its reader applies what comes back.
    fn start(rooms: Rooms) -> Rc<Hop> {
        use std::os::fd::AsRawFd;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        // The child inherits its end (std opens sockets close-on-exec).
        // SAFETY: fcntl on a descriptor this function owns.
        unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) };
        let mut peer = std::process::Command::new(std::env::current_exe().expect("own path"))
            .args(["ceiling-peer", "--fd", &theirs.as_raw_fd().to_string()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn the ceiling's peer");
        drop(theirs);
        // The peer ends with the socket, at the ceiling's end; if it ends
        // first, nothing is applied any more: end too, rather than measure
        // a server that drops every message.
        std::thread::spawn(move || {
            let status = peer.wait();
            eprintln!("ceiling: its peer ended ({status:?})");
            std::process::exit(1);
        });
        ours.set_nonblocking(true).expect("non-blocking");
        let hop = Rc::new(Hop {
            socket: tokio::net::UnixStream::from_std(ours).expect("register"),
            pending: RefCell::default(),
            flush: tokio::sync::Notify::new(),
        });
        tokio::task::spawn_local(hop.clone().flusher());
        tokio::task::spawn_local(hop.clone().applier(rooms));
        hop
    }

    /// Sends `payload` from `user` in `room` to the peer: length, room, user,
    /// payload (one write while the socket takes it).
    fn send(&self, room: &str, user: &str, payload: &[u8]) {
        let mut pending = self.pending.borrow_mut();
        let flushing = !pending.is_empty();
        let len = 4 + room.len() + user.len() + payload.len();
        pending.extend_from_slice(&(len as u32).to_le_bytes());
        for part in [room.as_bytes(), user.as_bytes()] {
            pending.extend_from_slice(&(part.len() as u16).to_le_bytes());
            pending.extend_from_slice(part);
        }
        pending.extend_from_slice(payload);
        if flushing {
            return; // the flusher writes it after what waits before it
        }
        if let Ok(n) = self.socket.try_write(&pending) {
            pending.drain(..n);
        }
        if !pending.is_empty() {
            self.flush.notify_one();
        }
    }

    async fn flusher(self: Rc<Hop>) {
        loop {
            self.flush.notified().await;
            while !self.pending.borrow().is_empty() {
                if self.socket.writable().await.is_err() {
                    peer_lost()
                }
                let mut pending = self.pending.borrow_mut();
                match self.socket.try_write(&pending) {
                    Ok(n) => drop(pending.drain(..n)),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => peer_lost(),
                }
            }
        }
    }

    /// Applies each message the peer sends back, then broadcasts its room.
    async fn applier(self: Rc<Hop>, rooms: Rooms) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut have = 0;
        loop {
            if self.socket.readable().await.is_err() {
                peer_lost()
            }
            if have == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            match self.socket.try_read(&mut buf[have..]) {
                Ok(0) => peer_lost(),
                Ok(n) => have += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => peer_lost(),
            }
            let mut at = 0;
            while let Some((room, user, payload, used)) = hop_message(&buf[at..have]) {
                at += used;
                // A leave (applied at once) can overtake the user's last
                // moves: those are dropped, not turned into a ghost cursor.
                let member = rooms
                    .borrow()
                    .get(room)
                    .is_some_and(|r| r.members.iter().any(|m| m.user == user));
                if member {
                    apply(&rooms, room, user, payload);
                    broadcast(&rooms, room);
                }
            }
            buf.copy_within(at..have, 0);
            have -= at;
        }
    }
}

/// The socket to the peer failed or ended: nothing would be applied any
/// more, so the ceiling ends (see `Hop::start`).
fn peer_lost() -> ! {
    eprintln!("ceiling: the socket to its peer ended");
    std::process::exit(1);
}

/// One message at the front of `buf` as [`Hop::send`] encodes it: (room,
/// user, payload, bytes used).
fn hop_message(buf: &[u8]) -> Option<(&str, &str, &[u8], usize)> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    let message = buf.get(4..4 + len)?;
    let mut at = 0;
    let mut part = || {
        let n = u16::from_le_bytes(message[at..at + 2].try_into().unwrap()) as usize;
        let text = std::str::from_utf8(&message[at + 2..at + 2 + n]).unwrap_or("");
        at += 2 + n;
        text
    };
    let (room, user) = (part(), part());
    Some((room, user, &message[at..], 4 + len))
}

/// The peer process of `ceiling --hop`: sends every byte it reads straight
/// back, each read's worth in one write (as cheap as a hop can be).
pub fn peer(fd: i32) {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    // SAFETY: the descriptor was inherited for this process to own.
    let mut socket = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match socket.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if socket.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// A client's message: a created shape or a cursor move.
fn apply(rooms: &Rooms, room: &str, user: &str, payload: &[u8]) {
    if payload.windows(14).any(|w| w == b"\"shape_create\"") {
        shape(rooms, room, user, payload);
    } else {
        cursor(rooms, room, user, payload);
    }
}

pub fn run(port: u16, hop: bool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let rooms: Rooms = Rc::default();
        // Before the line that says it listens: the peer is there by then.
        let hop = hop.then(|| Hop::start(rooms.clone()));
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        println!(
            "ceiling listening on 127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let _ = stream.set_nodelay(true);
            tokio::task::spawn_local(serve(stream, rooms.clone(), hop.clone()));
        }
    });
}

/// `userId` and `roomId` from the token's payload (not verified: no auth here).
fn identity(request: &str) -> Option<(String, String)> {
    let token = request.split("token=").nth(1)?.split([' ', '&']).next()?;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some((
        claims["userId"].as_str()?.to_owned(),
        claims["roomId"].as_str()?.to_owned(),
    ))
}

async fn serve(mut stream: TcpStream, rooms: Rooms, hop: Option<Rc<Hop>>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut have = 0;
    let head_end = loop {
        let Ok(n) = stream.read(&mut buf[have..]).await else {
            return;
        };
        if n == 0 {
            return;
        }
        have += n;
        if let Some(pos) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
    };
    let request = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let Some((user, room)) = identity(&request) else {
        return;
    };
    let Some(key) = request.lines().find_map(|l| {
        l.strip_prefix("Sec-WebSocket-Key: ")
            .or_else(|| l.strip_prefix("sec-websocket-key: "))
    }) else {
        return;
    };
    let accept =
        tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let socket = Rc::new(stream);
    rooms
        .borrow_mut()
        .entry(room.clone())
        .or_default()
        .members
        .push(Member {
            user: user.clone(),
            socket: socket.clone(),
            pending: Vec::new(),
        });
    broadcast(&rooms, &room);

    // Read client frames (masked, small): act on text frames, stop on close.
    buf.copy_within(head_end..have, 0);
    have -= head_end;
    loop {
        while let Some((opcode, payload, used)) = frame(&buf[..have]) {
            if opcode == 8 {
                leave(&rooms, &room, &user);
                return;
            }
            if opcode == 1 {
                match &hop {
                    Some(hop) => hop.send(&room, &user, &payload),
                    None => {
                        apply(&rooms, &room, &user, &payload);
                        broadcast(&rooms, &room);
                    }
                }
            }
            buf.copy_within(used..have, 0);
            have -= used;
        }
        if socket.readable().await.is_err() {
            break;
        }
        match socket.try_read(&mut buf[have..]) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => break,
        }
    }
    leave(&rooms, &room, &user);
}

/// One complete client frame at the front of `buf`: (opcode, unmasked payload, bytes used).
fn frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let (len, mut at) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let mask: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    at += 4;
    let payload = buf.get(at..at + len)?;
    let unmasked = payload
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    Some((opcode, unmasked, at + len))
}

/// Keeps the raw `"x":…,"y":…` of a cursor move (byte search, no JSON parsing).
fn cursor(rooms: &Rooms, room: &str, user: &str, payload: &[u8]) {
    let Some(start) = payload.windows(4).position(|w| w == b"\"x\":") else {
        return;
    };
    let end = payload.len() - 1; // the closing brace
    let xy = payload[start..end].to_vec();
    let mut rooms = rooms.borrow_mut();
    let Some(r) = rooms.get_mut(room) else { return };
    match r.cursors.iter_mut().find(|(u, _)| u == user) {
        Some((_, v)) => *v = xy,
        None => r.cursors.push((user.to_owned(), xy)),
    }
}

/// Stores a created shape in the server's field order and size (its raw
/// `"x":…,"height":…` bytes between the server's fixed fields; no JSON parsing).
fn shape(rooms: &Rooms, room: &str, user: &str, payload: &[u8]) {
    let Some(start) = payload.windows(4).position(|w| w == b"\"x\":") else {
        return;
    };
    let end = payload.len() - 1; // the closing brace
    let mut rooms = rooms.borrow_mut();
    let Some(r) = rooms.get_mut(room) else { return };
    if r.shapes.len() >= MAX_SHAPES {
        return;
    }
    let mut json = format!(
        "{{\"id\":\"{:016x}-{:x}\",\"type\":\"rectangle\",",
        0x5eed_0000_0000_0000u64,
        r.shapes.len() + 1
    )
    .into_bytes();
    json.extend_from_slice(&payload[start..end]);
    json.extend_from_slice(b",\"userId\":\"");
    json.extend_from_slice(user.as_bytes());
    json.extend_from_slice(
        b"\",\"timestamp\":\"2024-01-01T12:00:00.000Z\",\"fill\":\"#3b82f6\",\"stroke\":\"#1d4ed8\",\"rotation\":0}",
    );
    r.shapes.push(json);
}

fn leave(rooms: &Rooms, room: &str, user: &str) {
    if let Some(r) = rooms.borrow_mut().get_mut(room) {
        r.members.retain(|m| m.user != user);
        r.cursors.retain(|(u, _)| u != user);
    }
}

/// Assembles the room's snapshot frame once and writes it to every member.
fn broadcast(rooms: &Rooms, room: &str) {
    let mut rooms = rooms.borrow_mut();
    let Some(r) = rooms.get_mut(room) else { return };
    let shape_bytes: usize = r.shapes.iter().map(|s| s.len() + 1).sum();
    let mut json = Vec::with_capacity(64 + r.cursors.len() * 96 + shape_bytes);
    json.extend_from_slice(b"{\"connectedUsers\":[");
    for (i, m) in r.members.iter().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        json.push(b'"');
        json.extend_from_slice(m.user.as_bytes());
        json.push(b'"');
    }
    json.extend_from_slice(b"],\"cursors\":[");
    for (i, (user, xy)) in r.cursors.iter().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        json.extend_from_slice(b"{\"userId\":\"");
        json.extend_from_slice(user.as_bytes());
        json.extend_from_slice(b"\",");
        json.extend_from_slice(xy);
        json.extend_from_slice(b",\"timestamp\":\"2024-01-01T12:00:00.000Z\"}");
    }
    json.extend_from_slice(b"],\"shapes\":[");
    for (i, shape) in r.shapes.iter().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        json.extend_from_slice(shape);
    }
    json.extend_from_slice(b"]}");
    let mut frame = Vec::with_capacity(json.len() + 10);
    frame.push(0x81);
    match json.len() {
        n if n < 126 => frame.push(n as u8),
        n if n < 65536 => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&json);
    for m in &mut r.members {
        if !m.pending.is_empty() {
            match m.socket.try_write(&m.pending) {
                Ok(n) => {
                    m.pending.drain(..n);
                }
                Err(_) => continue,
            }
            if !m.pending.is_empty() {
                continue; // still behind: skip this (superseded) snapshot
            }
        }
        match m.socket.try_write(&frame) {
            Ok(n) if n < frame.len() => m.pending.extend_from_slice(&frame[n..]),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => {}
        }
    }
}
