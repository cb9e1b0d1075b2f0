use futures_util::{SinkExt, StreamExt};
use interprocess::local_socket::tokio::Stream as LocalStream;
use interprocess::local_socket::traits::tokio::Listener as _;
use interprocess::local_socket::{GenericNamespaced, ListenerOptions, ToNsName};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::lifecycle::handshake;
use super::link::{PING_QUEUE, Reader, Writer, write_frames};
use super::slot_task::{self, Control};
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
/// The restore completes (the slot's task reads while the writer writes) and
/// every snapshot reaches the room.
#[tokio::test]
async fn a_restore_goes_through_while_the_worker_writes_without_reading() {
    use crate::rooms::{ConnState, Membership};
    use contract::ipc::ConnId;
    const EVENTS: usize = 4000;
    const SNAPSHOTS: usize = 16;
    const SNAPSHOT_BYTES: usize = 256 * 1024;
    let ((reader, mut writer), (mut w_reader, mut w_writer)) = socket_pair().await;
    let (registry, inboxes) = Registry::new(1, 1, 1);
    let registry = Arc::new(registry);
    let metrics = Arc::new(Metrics::new(&Default::default()));
    let (queue, mut frames) = crate::worker_queue::channel();
    let slot = Arc::new(WorkerSlot::new(WorkerId(0), queue.clone()));
    let (control, controlled) = mpsc::unbounded_channel();
    tokio::spawn(slot_task::run(
        SlotRooms::new(WorkerId(0), queue, registry.clone()),
        inboxes.into_iter().next().unwrap(),
        controlled,
        slot.clone(),
        registry.clone(),
        metrics,
    ));
    let room = RoomId("big".into());
    let (conn_state, mut conn) = ConnState::channel();
    let handle = registry
        .register(&room, ConnId(1), "u".into(), conn_state)
        .unwrap();
    handle.join(ConnId(1), None, false, false);
    for _ in 0..EVENTS {
        handle
            .forward(ConnId(1), "x".repeat(1000).into())
            .await
            .unwrap();
    }
    let (answer, answered) = oneshot::channel();
    control
        .send(Control::Failed {
            blamed: Vec::new(),
            suspected: Vec::new(),
            answer,
        })
        .unwrap_or_else(|_| panic!("the slot's task runs"));
    let (restoring, _) = answered.await.unwrap();
    assert_eq!(restoring, std::slice::from_ref(&room));
    while frames.try_recv().is_ok() {}
    let (ended, _link_ended) = oneshot::channel();
    control
        .send(Control::Attach {
            reader,
            ended,
            restore_wait: Duration::from_secs(30),
        })
        .unwrap_or_else(|_| panic!("the slot's task runs"));

    let fake_worker = async {
        let admit = FromWorker::JoinAccepted {
            room: RoomId("big".into()),
            conn: ConnId(1),
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
    let restored = async {
        loop {
            if registry.monitor().await[0]["restoring"] == false {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let serve = async {
        tokio::select! {
            why = write_frames(&mut frames, &mut pings, &mut writer) => panic!("{why}"),
            () = restored => {}
        }
    };
    let (_, _keep_open) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(serve, fake_worker)
    })
    .await
    .expect("restore and snapshots went through (no deadlock)");
    let snapshots = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Membership::Admitted(rx) = conn.borrow_and_update().membership.clone()
                && rx
                    .borrow()
                    .as_ref()
                    .is_some_and(|p| p.version == SNAPSHOTS as u64)
            {
                return rx;
            }
            conn.changed().await.unwrap();
        }
    })
    .await
    .expect("admitted, and every snapshot published");
    let newest = snapshots.borrow().clone().unwrap();
    assert!(
        newest
            .message
            .starts_with(format!("{:04}", SNAPSHOTS - 1).as_bytes())
    );
    assert!(!slot.restoring.load(Ordering::Relaxed));
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
