use futures_util::{SinkExt, StreamExt};
use interprocess::local_socket::tokio::Stream as LocalStream;
use interprocess::local_socket::traits::tokio::Listener as _;
use interprocess::local_socket::{GenericNamespaced, ListenerOptions, ToNsName};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::lifecycle::handshake;
use super::link::{LinkEnd, PING_QUEUE, Reader, Writer, read_frames, write_frames};
use super::recovery::restore_room;
use super::*;
use contract::ipc::{FromWorker, IPC_VERSION};
use tokio::sync::mpsc;
use transport::IpcCodec;
use transport::{IpcReader, IpcWriter};

/// A connected pair of local sockets, as supervisor (reader, writer) and the
/// fake worker's (reader, writer).
async fn socket_pair() -> (
    (Reader, Writer),
    (
        FramedRead<IpcReader, IpcCodec<ToWorker, FromWorker>>,
        FramedWrite<IpcWriter, IpcCodec<ToWorker, FromWorker>>,
    ),
) {
    use interprocess::local_socket::traits::tokio::Stream as _;
    let name = format!("session-server-test.{}.sock", rand::random::<u64>());
    let listener = ListenerOptions::new()
        .name(name.as_str().to_ns_name::<GenericNamespaced>().unwrap())
        .create_tokio()
        .unwrap();
    let ns_name = name.as_str().to_ns_name::<GenericNamespaced>().unwrap();
    let (accepted, connected) = tokio::join!(listener.accept(), LocalStream::connect(ns_name));
    let (sr, sw) = transport::split(accepted.unwrap()).unwrap();
    let (wr, ww) = transport::split(connected.unwrap()).unwrap();
    (
        (
            FramedRead::new(sr, IpcCodec::new()),
            FramedWrite::new(sw, IpcCodec::new()),
        ),
        (
            FramedRead::new(wr, IpcCodec::new()),
            FramedWrite::new(ww, IpcCodec::new()),
        ),
    )
}

async fn handshake_with(reply: FromWorker) -> anyhow::Result<()> {
    let ((mut reader, mut writer), (mut w_reader, mut w_writer)) = socket_pair().await;
    let fake_worker = async move {
        let hello = w_reader.next().await.unwrap().unwrap();
        assert_eq!(
            hello,
            ToWorker::Hello {
                ipc_version: IPC_VERSION,
                worker_id: WorkerId(4)
            }
        );
        w_writer.send(reply).await.unwrap();
        (w_reader, w_writer)
    };
    let (result, _keep_open) = tokio::join!(
        handshake(WorkerId(4), &mut reader, &mut writer, 99),
        fake_worker
    );
    result
}

/// Both directions full at once: the worker writes 4 MB of snapshots before
/// it reads anything, while a room with a 4 MB journal is restored into it.
/// The restore completes (the supervisor reads while it writes) and every
/// snapshot reaches the room.
#[tokio::test]
async fn a_restore_goes_through_while_the_worker_writes_without_reading() {
    use crate::rooms::ConnState;
    const EVENTS: usize = 4000;
    const SNAPSHOTS: usize = 16;
    const SNAPSHOT_BYTES: usize = 256 * 1024;
    let ((mut reader, mut writer), (mut w_reader, mut w_writer)) = socket_pair().await;
    let (queues, frames) = worker_queues(1);
    let mut frames = frames.into_iter().next().unwrap();
    let registry = Registry::new(queues, 1, 1);
    let metrics = Metrics::new(&Default::default());
    let slot = WorkerSlot::new(WorkerId(0), registry.queue(WorkerId(0)).clone());
    let room = RoomId("big".into());
    let (conn_state, mut conn) = tokio::sync::watch::channel(ConnState::pending());
    let handle = registry
        .register(&room, contract::ipc::ConnId(1), "u".into(), conn_state)
        .unwrap();
    handle.join(contract::ipc::ConnId(1), None).await.unwrap();
    for _ in 0..EVENTS {
        let text = "x".repeat(1000);
        handle
            .forward(contract::ipc::ConnId(1), text)
            .await
            .unwrap();
    }
    while frames.try_recv().is_ok() {}
    let restoring = registry.worker_failed(WorkerId(0));
    assert_eq!(restoring.len(), 1);
    let entry = &restoring[0];

    let fake_worker = async {
        let admit = FromWorker::JoinAccepted {
            room: RoomId("big".into()),
            conn: contract::ipc::ConnId(1),
        };
        w_writer.send(admit).await.unwrap();
        for i in 0..SNAPSHOTS {
            let json = format!("{i:04}{}", "s".repeat(SNAPSHOT_BYTES));
            let snapshot = FromWorker::Snapshot {
                room: RoomId("big".into()),
                json,
                ops: None,
                deflated: None,
            };
            w_writer.send(snapshot).await.unwrap();
        }
        let mut events = 0;
        loop {
            match w_reader.next().await.unwrap().unwrap() {
                ToWorker::Event(_) => events += 1,
                ToWorker::Sync { room, token } => {
                    w_writer
                        .send(FromWorker::Synced { room, token })
                        .await
                        .unwrap();
                    break;
                }
                _ => {}
            }
        }
        assert_eq!(events, EVENTS + 1); // the join, then the messages
        (w_reader, w_writer)
    };
    let (_pinger, mut pings) = mpsc::channel(PING_QUEUE);
    let serve = async {
        tokio::select! {
            why = write_frames(Vec::new(), &mut frames, &mut pings, &mut writer, &slot) => panic!("{why}"),
            why = read_frames(&mut reader, &registry, &metrics, &slot) => panic!("{why}"),
            () = restore_room(entry, &registry, &slot, Duration::from_secs(30)) => {}
        }
    };
    let (_, _keep_open) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(serve, fake_worker)
    })
    .await
    .expect("restore and snapshots went through (no deadlock)");
    let crate::rooms::Membership::Admitted(snapshots) = conn.borrow_and_update().membership.clone()
    else {
        panic!("member not admitted");
    };
    let newest = snapshots.borrow().clone().unwrap();
    assert_eq!(newest.version, SNAPSHOTS as u64);
    assert!(
        newest
            .message
            .starts_with(format!("{:04}", SNAPSHOTS - 1).as_bytes())
    );
    assert_eq!(registry.monitor()[0]["restoring"], false);
}

/// A crash is blamed only on restores the worker had started taking and not
/// answered: not on one it answered, nor on one whose frames it never got.
#[tokio::test]
async fn only_restores_taken_and_unanswered_are_blamed() {
    let ((mut reader, mut writer), (mut w_reader, mut w_writer)) = socket_pair().await;
    let metrics = Metrics::new(&Default::default());
    let (queue, mut frames) = crate::worker_queue::channel();
    let registry = Registry::new(vec![queue.clone()], 1, 1);
    let slot = WorkerSlot::new(WorkerId(0), queue);
    for (token, name) in [(1, "answered"), (2, "taken"), (3, "queued-only")] {
        let (answered, _answer) = oneshot::channel();
        lock(&slot.restores).insert(
            RoomId(name.into()),
            InFlight {
                token,
                taken: false,
                answered: Some(answered),
            },
        );
    }
    for (token, name) in [(1, "answered"), (2, "taken")] {
        let room = RoomId(name.into());
        let restore = ToWorker::RestoreRoom {
            room: room.clone(),
            id_seed: 0,
            image: None,
        };
        slot.queue.send(restore).await.unwrap();
        slot.queue
            .send(ToWorker::Sync { room, token })
            .await
            .unwrap();
    }
    // Reads both restores, answers the first, then dies.
    let fake_worker = async move {
        for _ in 0..4 {
            w_reader.next().await.unwrap().unwrap();
        }
        let room = RoomId("answered".into());
        w_writer
            .send(FromWorker::Synced { room, token: 1 })
            .await
            .unwrap();
    };
    let (_pinger, mut pings) = mpsc::channel(PING_QUEUE);
    let serve = async {
        tokio::select! {
            why = write_frames(Vec::new(), &mut frames, &mut pings, &mut writer, &slot) => why,
            why = read_frames(&mut reader, &registry, &metrics, &slot) => why,
        }
    };
    let (why, ()) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(serve, fake_worker)
    })
    .await
    .unwrap();
    assert!(matches!(why, LinkEnd::Closed), "{why:?}");
    assert_eq!(why.to_string(), "IPC socket closed by worker");
    assert_eq!(slot.take_in_flight(), [RoomId("taken".into())]);
    assert!(lock(&slot.restores).is_empty());
}

#[tokio::test]
async fn handshake_accepts_the_spawned_worker() {
    let reply = FromWorker::Hello {
        ipc_version: IPC_VERSION,
        pid: 1,
        nonce: 99,
    };
    handshake_with(reply).await.unwrap();
}

#[tokio::test]
async fn handshake_refuses_another_ipc_version() {
    let reply = FromWorker::Hello {
        ipc_version: IPC_VERSION + 1,
        pid: 1,
        nonce: 99,
    };
    let err = handshake_with(reply).await.unwrap_err().to_string();
    assert!(
        err.contains(&format!("worker speaks IPC version {}", IPC_VERSION + 1)),
        "{err}"
    );
}

#[tokio::test]
async fn handshake_refuses_a_peer_without_the_nonce() {
    let reply = FromWorker::Hello {
        ipc_version: IPC_VERSION,
        pid: 1,
        nonce: 98,
    };
    let err = handshake_with(reply).await.unwrap_err().to_string();
    assert!(err.contains("wrong nonce"), "{err}");
}
