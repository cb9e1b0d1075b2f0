//! `memory` scenario: what full rooms cost in resident memory, per process.
//!
//! R rooms, each with M members. Each room's first member pastes S shapes
//! (`shape_create`, in batches of B, each batch sent while reading and then
//! acknowledged by a snapshot that shows it, as a real client's paste is); every
//! member reads every snapshot until its room shows all S. After `--settle-secs`
//! the supervisor's and each worker's memory is read from /proc (VmRSS, VmHWM,
//! RssAnon from `status`; Pss from `smaps_rollup` when readable); then every
//! member leaves (rooms are saved, then freed) and it is read again after each of
//! `--after-secs`. Prints one JSON object.
//!
//! ```text
//! loadgen memory --url ws://127.0.0.1:8000 --secret S --server-pid PID \
//!   --rooms 1 --members 2 --shapes 1000 --text-chars 10000 --newlines 2000
//! ```
//!
//! With `--shapes 0` it only reads the server's memory (an idle baseline, read
//! the same way). `--admin-token` (the server's `ADMIN_TOKEN`) names the rooms
//! each worker holds, from `/status`.

use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::{Socket, connect_offering, host_of, token};

#[derive(clap::Args, Clone)]
pub struct MemoryArgs {
    /// Server address, e.g. ws://127.0.0.1:8000.
    #[arg(long)]
    url: String,
    /// The server's JWT_SECRET.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// Supervisor pid; its child processes are its workers.
    #[arg(long)]
    server_pid: u32,
    /// The server's ADMIN_TOKEN: each worker's rooms are read from `/status`.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Members per room (the first one pastes the shapes).
    #[arg(long, default_value_t = 2)]
    members: usize,
    /// Shapes pasted into each room.
    #[arg(long, default_value_t = 1000)]
    shapes: usize,
    /// `shapeType` of the shapes: `text` (with `--text-chars`) or any other
    /// type (no text).
    #[arg(long, default_value = "text")]
    shape_type: String,
    /// Bytes of each text shape's `text` (its message must fit
    /// `--max-message-bytes`; all of them, the room's 12 MiB board budget).
    #[arg(long, default_value_t = 10_000)]
    text_chars: usize,
    /// How many of those bytes are line breaks (each is 2 bytes once escaped in
    /// JSON): 2,000 bring a 10,000-byte text's shape to 12 KiB, as the
    /// budgets of issue 22's measurements were.
    #[arg(long, default_value_t = 0)]
    newlines: usize,
    /// Shapes per batch of the paste.
    #[arg(long, default_value_t = 20)]
    batch: usize,
    /// Wait after the last member saw every shape, before reading memory.
    #[arg(long, default_value_t = 3.0)]
    settle_secs: f64,
    /// After everyone left: read memory again at each of these times (seconds
    /// since the last connection closed, comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "5,15")]
    after_secs: Vec<f64>,
    /// While settling, the first member of each room moves one of its first
    /// ten shapes this often (a member dragging a shape sends one every 50
    /// ms), and memory is sampled every 250 ms: `busy_max_total_rss_kib`.
    /// 0: no edits.
    #[arg(long, default_value_t = 0)]
    edit_every_ms: u64,
    /// Texts of pseudo-random CJK characters instead of `x`s (`--text-chars`
    /// bytes, 3 a character): what compresses least of what users paste.
    #[arg(long, default_value_t = false)]
    cjk: bool,
    /// Members offer permessage-deflate, as browsers do (the worker then
    /// keeps its rooms' compressed chunks, and snapshots carry both forms).
    #[arg(long, default_value_t = false)]
    deflate: bool,
    /// Prefix of the room ids (rooms are `<prefix>-<n>`).
    #[arg(long, default_value = "mem")]
    room_prefix: String,
}

/// One process's memory, in KiB (`None`: not readable).
fn process_memory(pid: u32) -> Value {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |text: &str, name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    json!({
        "pid": pid,
        "rss_kib": field(&status, "VmRSS"),
        "hwm_kib": field(&status, "VmHWM"),
        "rss_anon_kib": field(&status, "RssAnon"),
        "rss_file_kib": field(&status, "RssFile"),
        "pss_kib": field(&rollup, "Pss"),
        "pss_anon_kib": field(&rollup, "Pss_Anon"),
    })
}

/// The supervisor's child processes (its workers), from
/// `/proc/PID/task/*/children`, sorted.
fn children(pid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            pids.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// `/status` (with the admin token): each worker's pid and rooms.
async fn status(url: &str, admin_token: &str) -> Option<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = host_of(url);
    let mut tcp = tokio::net::TcpStream::connect(&host).await.ok()?;
    let request = format!(
        "GET /status HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {admin_token}\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.ok()?;
    let response = String::from_utf8_lossy(&response);
    let (_, body) = response.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

/// The supervisor's and each worker's memory, and their sum.
async fn server_memory(args: &MemoryArgs) -> Value {
    let status = match &args.admin_token {
        Some(t) => status(&args.url, t).await,
        None => None,
    };
    let rooms_of = |pid: u32| -> Value {
        status
            .as_ref()
            .and_then(|s| s["workers"].as_array())
            .and_then(|ws| {
                ws.iter()
                    .find(|w| w["pid"].as_u64() == Some(u64::from(pid)))
            })
            .map_or(Value::Null, |w| w["rooms"].clone())
    };
    let supervisor = process_memory(args.server_pid);
    let workers: Vec<Value> = children(args.server_pid)
        .into_iter()
        .map(|pid| {
            let mut m = process_memory(pid);
            m["rooms"] = rooms_of(pid);
            m
        })
        .collect();
    let total = |key: &str| -> u64 {
        supervisor[key].as_u64().unwrap_or(0)
            + workers
                .iter()
                .map(|w| w[key].as_u64().unwrap_or(0))
                .sum::<u64>()
    };
    json!({
        "total_rss_kib": total("rss_kib"),
        "total_pss_kib": total("pss_kib"),
        "supervisor": supervisor,
        "workers": workers,
    })
}

/// Shapes in a snapshot, counted fast (each shape's JSON starts with `{"id":`;
/// the texts sent here never contain it).
fn shape_count(snapshot: &str) -> usize {
    snapshot.matches("{\"id\":").count()
}

/// Reads a member's connection until `stop` turns true, publishing the newest
/// snapshot and its shape count.
async fn read_snapshots(
    mut stream: SplitStream<Socket>,
    seen: watch::Sender<(usize, Utf8Bytes)>,
    mut stop: watch::Receiver<bool>,
) -> SplitStream<Socket> {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return stream,
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let count = shape_count(&text);
                    seen.send_replace((count, text));
                }
                Some(Ok(Message::Close(frame))) => panic!("closed by the server: {frame:?}"),
                Some(Ok(_)) => {}
                other => panic!("connection ended: {other:?}"),
            },
        }
    }
}

/// A `shape_create` as a client sends it.
fn shape_message(args: &MemoryArgs, k: usize) -> String {
    let (x, y) = (40 * (k % 25), 30 * (k / 25));
    if args.shape_type != "text" {
        return format!(
            r#"{{"type":"shape_create","shapeType":"{}","x":{x},"y":{y},"width":120,"height":80}}"#,
            args.shape_type
        );
    }
    // `newlines` line breaks spread evenly over `text_chars` bytes, and the
    // shape's number first so texts differ.
    let mut text = format!("{k} ");
    if args.cjk {
        let mut state = k as u32 ^ 0x9e37_79b9;
        while text.len() + 3 <= args.text_chars {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            text.push(char::from_u32(0x4e00 + (state >> 8) % 20_000).expect("a CJK character"));
        }
    }
    let every = (args.text_chars / args.newlines.max(1)).max(1);
    let mut line_breaks = 0;
    while text.len() < args.text_chars {
        if line_breaks < args.newlines && text.len() % every == every - 1 {
            text.push('\n');
            line_breaks += 1;
        } else {
            text.push('x');
        }
    }
    let json_text = serde_json::to_string(&text).expect("a string");
    format!(
        r#"{{"type":"shape_create","shapeType":"text","x":{x},"y":{y},"width":200,"height":100,"text":{json_text}}}"#
    )
}

struct Member {
    sink: SplitSink<Socket, Message>,
    seen: watch::Receiver<(usize, Utf8Bytes)>,
    reader: tokio::task::JoinHandle<SplitStream<Socket>>,
}

/// For `--settle-secs`: the first member of each room moves one of its first
/// ten shapes every `--edit-every-ms`, and the server's total resident memory
/// is sampled every 250 ms; returns the largest sample (KiB).
async fn edit_while_settling(args: &MemoryArgs, rooms: &mut [Vec<Member>]) -> u64 {
    let ids: Vec<Vec<String>> = rooms
        .iter()
        .map(|members| {
            let text = members[0].seen.borrow().1.clone();
            let snapshot: Value = serde_json::from_str(&text).expect("snapshot is JSON");
            snapshot["shapes"]
                .as_array()
                .expect("shapes")
                .iter()
                .take(10)
                .filter_map(|shape| shape["id"].as_str().map(str::to_owned))
                .collect()
        })
        .collect();
    let end = Instant::now() + Duration::from_secs_f64(args.settle_secs);
    let mut edits = tokio::time::interval(Duration::from_millis(args.edit_every_ms));
    let mut samples = tokio::time::interval(Duration::from_millis(250));
    let (mut moves, mut busy_max) = (0u64, 0u64);
    while Instant::now() < end {
        tokio::select! {
            _ = edits.tick() => {
                moves += 1;
                for (members, ids) in rooms.iter_mut().zip(&ids) {
                    let Some(id) = ids.get(moves as usize % ids.len().max(1)) else {
                        continue;
                    };
                    let update = json!({"type":"shape_update","shapeId":id,"x":moves % 1000}).to_string();
                    members[0].sink.send(Message::text(update)).await.expect("send update");
                }
            }
            _ = samples.tick() => {
                let total = server_memory(args).await["total_rss_kib"].as_u64().unwrap_or(0);
                busy_max = busy_max.max(total);
            }
        }
    }
    busy_max
}

/// Waits until the member's newest snapshot shows at least `count` shapes.
async fn until_shapes(member: &mut Member, count: usize, room: &str) {
    tokio::time::timeout(
        Duration::from_secs(60),
        member.seen.wait_for(|(n, _)| *n >= count),
    )
    .await
    .unwrap_or_else(|_| panic!("{room}: a snapshot with {count} shapes within 60 s"))
    .expect("reader alive");
}

pub async fn run(args: MemoryArgs) -> Value {
    let host = host_of(&args.url);
    let before = server_memory(&args).await;
    let started = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut rooms: Vec<Vec<Member>> = Vec::with_capacity(args.rooms);
    let mut message_bytes = (usize::MAX, 0);
    for r in 0..args.rooms {
        let room = format!("{}-{r}", args.room_prefix);
        let mut members = Vec::with_capacity(args.members);
        for m in 0..args.members {
            let url = format!(
                "{}/?token={}",
                args.url.trim_end_matches('/'),
                token(&args.secret, &host, &format!("u{r}-{m}"), &room)
            );
            let (mut ws, _) = connect_offering(url, None, args.deflate)
                .await
                .expect("connect");
            let first = ws.next().await.expect("first snapshot").expect("no error");
            let text = first.into_text().expect("a text snapshot");
            let (sink, stream) = ws.split();
            let (seen_tx, seen) = watch::channel((shape_count(&text), text));
            let reader = tokio::spawn(read_snapshots(stream, seen_tx, stop_rx.clone()));
            members.push(Member { sink, seen, reader });
        }
        // The paste: each batch written in one go (the reader task reads
        // meanwhile), then acknowledged by a snapshot that shows it.
        let creator = &mut members[0];
        let mut sent = 0;
        while sent < args.shapes {
            let end = (sent + args.batch).min(args.shapes);
            for k in sent..end {
                let msg = shape_message(&args, k);
                message_bytes = (
                    message_bytes.0.min(msg.len()),
                    message_bytes.1.max(msg.len()),
                );
                creator
                    .sink
                    .feed(Message::text(msg))
                    .await
                    .expect("send shape");
            }
            creator.sink.flush().await.expect("send shapes");
            sent = end;
            until_shapes(creator, sent, &room).await;
        }
        rooms.push(members);
    }
    for (r, members) in rooms.iter_mut().enumerate() {
        for member in members.iter_mut() {
            until_shapes(member, args.shapes, &format!("{}-{r}", args.room_prefix)).await;
        }
    }
    let filled_seconds = started.elapsed().as_secs_f64();
    // Every member's newest snapshot, parsed: the shapes it shows and their sizes.
    let mut shapes_seen = Vec::new();
    let (mut shape_min, mut shape_max, mut snapshot_bytes) = (usize::MAX, 0, 0);
    for members in &rooms {
        for member in members {
            let text = member.seen.borrow().1.clone();
            let snapshot: Value = serde_json::from_str(&text).expect("snapshot is JSON");
            let shapes = snapshot["shapes"].as_array().expect("shapes");
            shapes_seen.push(shapes.len());
            snapshot_bytes = snapshot_bytes.max(text.len());
            for shape in shapes {
                let len = shape.to_string().len();
                shape_min = shape_min.min(len);
                shape_max = shape_max.max(len);
            }
        }
    }
    let busy_max = if args.edit_every_ms > 0 {
        Some(edit_while_settling(&args, &mut rooms).await)
    } else {
        tokio::time::sleep(Duration::from_secs_f64(args.settle_secs)).await;
        None
    };
    let during = server_memory(&args).await;
    // Everyone leaves.
    stop_tx.send_replace(true);
    for members in rooms {
        for member in members {
            let stream = member.reader.await.expect("reader");
            let mut ws = member.sink.reunite(stream).expect("same connection");
            let _ = ws.close(None).await;
        }
    }
    let left = Instant::now();
    let mut after = Vec::new();
    for &secs in &args.after_secs {
        let at = left + Duration::from_secs_f64(secs);
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        let mut memory = server_memory(&args).await;
        memory["seconds_after_leaving"] = json!(secs);
        after.push(memory);
    }
    json!({
        "scenario": "memory",
        "rooms": args.rooms,
        "members": args.members,
        "shapes": args.shapes,
        "shape_type": args.shape_type,
        "text_chars": args.text_chars,
        "newlines": args.newlines,
        "batch": args.batch,
        "shape_create_bytes": {"min": message_bytes.0.min(message_bytes.1), "max": message_bytes.1},
        "shapes_seen_per_member": shapes_seen,
        "shape_json_bytes": {"min": shape_min.min(shape_max), "max": shape_max},
        "snapshot_bytes": snapshot_bytes,
        "filled_seconds": filled_seconds,
        "settle_secs": args.settle_secs,
        "edit_every_ms": args.edit_every_ms,
        "deflate": args.deflate,
        "cjk": args.cjk,
        "busy_max_total_rss_kib": busy_max,
        "before": before,
        "during": during,
        "after": after,
    })
}
