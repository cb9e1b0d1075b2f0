//! The Agones lifecycle against the real SDK server: Agones' own `sdk-server`
//! in local mode (`../shared/tools/agones-local/`, or `AGONES_SDK_SERVER`),
//! which keeps one GameServer in memory and answers as the cluster's sidecar
//! does. The `rooms` List follows the rooms (capacity `--max-rooms`), a room id
//! an allocation added before its room opened is given back after the grace,
//! a stale List or Counter from an earlier life is set right before `Ready`,
//! SIGTERM says `Shutdown`, and the Counter mode still counts. What local mode
//! cannot show (health withheld, the cluster's batching) stays with the fake
//! SDK server of `agones.rs`. Without the binary these tests print one line and
//! pass; `.ci/run` makes them required.

#[cfg(feature = "agones")]
mod with_sdk_server {
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use serde_json::{Value, json};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use crate::support::*;

    /// Agones' SDK server in local mode, on free loopback ports, with a
    /// GameServer whose `rooms` List and Counter start as given.
    struct SdkServer {
        child: Child,
        grpc_port: u16,
        http_port: u16,
        _dir: TempDir,
    }

    fn binary() -> Option<PathBuf> {
        let path = std::env::var_os("AGONES_SDK_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../shared/tools/agones-local/sdk-server"
                ))
            });
        if path.exists() {
            return Some(path);
        }
        if std::env::var_os("REQUIRE_AGONES_SDK_SERVER").is_some() {
            panic!("no Agones SDK server at {}", path.display());
        }
        eprintln!(
            "skipped: no Agones SDK server at {} (set AGONES_SDK_SERVER)",
            path.display()
        );
        None
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    impl SdkServer {
        /// `list`: the List's values at start (None: no List declared, as a
        /// fleet that declares only the Counter); `count`: the Counter's.
        async fn start(list: Option<&[&str]>, count: i64) -> Option<SdkServer> {
            let binary = binary()?;
            let dir = temp_dir("agones-local");
            let counters =
                format!("counters:\n    rooms:\n      count: {count}\n      capacity: 20\n");
            // The List's capacity as the fleet declares it (= --max-rooms):
            // local mode refuses every UpdateList ("no players for list"), so
            // the server cannot set it here (it can in a cluster).
            let lists = match list {
                Some(values) => format!(
                    "lists:\n    rooms:\n      capacity: 5\n      values: {}\n",
                    serde_json::to_string(values).unwrap()
                ),
                None => String::new(),
            };
            // Local mode reads Counters and Lists from `status` only.
            let yaml = format!(
                "apiVersion: agones.dev/v1\nkind: GameServer\nmetadata:\n  name: session-server-local\n  namespace: default\n\
                 spec:\n  ports:\n    - name: default\n      containerPort: 8000\n  {counters}  {lists}\
                 status:\n  state: Scheduled\n  address: 127.0.0.1\n  ports:\n    - name: default\n      port: 8000\n  {counters}  {lists}"
            );
            let file = dir.join("gameserver.yaml");
            std::fs::write(&file, yaml).unwrap();
            let (grpc_port, http_port) = (free_port(), free_port());
            let child = Command::new(binary)
                .arg("--local")
                .arg("-f")
                .arg(&file)
                .args(["--address", "localhost"])
                .args(["--grpc-port", &grpc_port.to_string()])
                .args(["--http-port", &http_port.to_string()])
                .args(["--health-port", &free_port().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("the SDK server starts");
            let sdk = SdkServer {
                child,
                grpc_port,
                http_port,
                _dir: dir,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while sdk.try_http("GET", "/gameserver", None).await.is_err() {
                assert!(
                    Instant::now() < deadline,
                    "the SDK server did not answer in 10 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Some(sdk)
        }

        /// The server under test: `AGONES_SDK_GRPC_PORT` set as Agones sets it,
        /// at most 5 rooms, health every 200 ms, a 1 s grace, and `extra`.
        fn serve(&self, extra: &[&str]) -> Server {
            let mut args = vec![
                "--workers",
                "2",
                "--max-rooms",
                "5",
                "--agones-health-interval-ms",
                "200",
                "--agones-empty-grace-ms",
                "1000",
                "--persist-debounce-ms",
                "50",
            ];
            args.extend_from_slice(extra);
            let port = self.grpc_port.to_string();
            Server::start_raw(
                &args,
                &[("JWT_SECRET", SECRET), ("AGONES_SDK_GRPC_PORT", &port)],
            )
        }

        async fn try_http(
            &self,
            method: &str,
            path: &str,
            body: Option<Value>,
        ) -> std::io::Result<(u16, Value)> {
            let mut stream = TcpStream::connect(("127.0.0.1", self.http_port)).await?;
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(request.as_bytes()).await?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await?;
            let answer = String::from_utf8_lossy(&answer);
            let status = answer
                .split(' ')
                .nth(1)
                .and_then(|code| code.parse().ok())
                .unwrap_or(0);
            let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
            // A chunked body: the JSON is between the first `{` and the last `}`.
            let json = match (body.find('{'), body.rfind('}')) {
                (Some(from), Some(to)) => {
                    serde_json::from_str(&body[from..=to]).unwrap_or(Value::Null)
                }
                _ => Value::Null,
            };
            Ok((status, json))
        }

        async fn http(&self, method: &str, path: &str, body: Option<Value>) -> Value {
            let (status, json) = self
                .try_http(method, path, body)
                .await
                .expect("the SDK server answers");
            assert_eq!(status, 200, "{method} {path}: {json}");
            json
        }

        async fn state(&self) -> String {
            let gs = self.http("GET", "/gameserver", None).await;
            gs["status"]["state"].as_str().unwrap_or("").to_owned()
        }

        /// The `rooms` List: its values (sorted) and capacity.
        async fn list(&self) -> (Vec<String>, i64) {
            let list = self.http("GET", "/v1beta1/lists/rooms", None).await;
            let mut values: Vec<String> = list["values"]
                .as_array()
                .map(|v| {
                    v.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            values.sort();
            (values, number(&list["capacity"]))
        }

        /// The `rooms` Counter: count and capacity.
        async fn counter(&self) -> (i64, i64) {
            let counter = self.http("GET", "/v1beta1/counters/rooms", None).await;
            (number(&counter["count"]), number(&counter["capacity"]))
        }

        /// Polls `/gameserver` until the GameServer is in `state`.
        async fn until_state(&self, state: &str) {
            self.until(
                "the state",
                Duration::from_secs(15),
                || self.state(),
                state.to_owned(),
            )
            .await;
        }

        /// Polls `read` until it returns `want`, for up to `within`.
        async fn until<T: PartialEq + std::fmt::Debug, F: std::future::Future<Output = T>>(
            &self,
            what: &str,
            within: Duration,
            read: impl Fn() -> F,
            want: T,
        ) {
            let deadline = Instant::now() + within;
            loop {
                let now = read().await;
                if now == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: {now:?} after {within:?}, not {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }

    impl Drop for SdkServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The gateway writes int64 as a JSON string.
    fn number(value: &Value) -> i64 {
        value
            .as_i64()
            .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(-1)
    }

    // Multi-threaded: the harness blocks this thread waiting for the server.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_rooms_list_follows_the_rooms_and_a_stale_one_is_set_right_before_ready() {
        let Some(sdk) = SdkServer::start(Some(&["stale-a", "stale-b"]), 0).await else {
            return;
        };
        let mut server = sdk.serve(&[]);
        // Ready, and by then the List says what the server holds: nothing
        // (read after the state changed: no room is open yet).
        sdk.until_state("Ready").await;
        let at_ready = sdk.list().await;
        assert_eq!(at_ready, (vec![], 5), "the List when the server went Ready");

        let alice = server.join("alice", "room-1").await;
        let bob = server.join("bob", "room-2").await;
        sdk.until(
            "the List",
            Duration::from_secs(5),
            || sdk.list(),
            (vec!["room-1".to_owned(), "room-2".to_owned()], 5),
        )
        .await;
        assert_eq!(sdk.state().await, "Allocated");

        // A room freed leaves the List.
        alice.close().await;
        sdk.until(
            "the List",
            Duration::from_secs(10),
            || sdk.list(),
            (vec!["room-2".to_owned()], 5),
        )
        .await;

        // SIGTERM: Agones is told Shutdown.
        server.signal("TERM");
        assert_eq!(server.wait_exit(Duration::from_secs(15)), Some(0));
        sdk.until_state("Shutdown").await;
        drop(bob);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_room_id_an_allocation_added_is_kept_while_its_room_opens_and_given_back_after_the_grace()
     {
        let Some(sdk) = SdkServer::start(Some(&[]), 0).await else {
            return;
        };
        let server = sdk.serve(&[]);
        sdk.until_state("Ready").await;

        // An allocation for room-a, whose user arrives: the id stays, now a room.
        sdk.http(
            "POST",
            "/v1beta1/lists/rooms:addValue",
            Some(json!({"value": "room-a"})),
        )
        .await;
        let _carol = server.join("carol", "room-a").await;
        // An allocation for room-b, whose user never comes: given back after
        // the grace (1 s), within a few health intervals.
        let added = Instant::now();
        sdk.http(
            "POST",
            "/v1beta1/lists/rooms:addValue",
            Some(json!({"value": "room-b"})),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            sdk.list().await.0,
            ["room-a", "room-b"],
            "a reservation is kept for the grace"
        );
        sdk.until(
            "the List",
            Duration::from_secs(5),
            || sdk.list(),
            (vec!["room-a".to_owned()], 5),
        )
        .await;
        assert!(added.elapsed() >= Duration::from_secs(1));
        // The given-back place is logged.
        server.logged("never opened here").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_counter_mode_counts_rooms_and_a_stale_count_is_set_right_before_ready() {
        let Some(sdk) = SdkServer::start(Some(&[]), 3).await else {
            return;
        };
        let server = sdk.serve(&[
            "--agones-rooms",
            "counter",
            "--agones-when-empty",
            "shutdown",
        ]);
        sdk.until_state("Ready").await;
        let at_ready = sdk.counter().await;
        assert_eq!(
            at_ready,
            (0, 5),
            "the count from before is not a reservation"
        );
        // With a count of 3 kept, the server would shut itself down after the
        // grace without ever holding a room; it stays Ready.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(sdk.state().await, "Ready");

        let dave = server.join("dave", "room-c").await;
        sdk.until(
            "the count",
            Duration::from_secs(5),
            || sdk.counter(),
            (1, 5),
        )
        .await;
        dave.close().await;
        sdk.until(
            "the count",
            Duration::from_secs(10),
            || sdk.counter(),
            (0, 5),
        )
        .await;
    }

    /// A sidecar frozen for a while (SIGSTOP): the room opened meanwhile still
    /// makes the server Allocated once it answers (the failed `Allocate()` is
    /// tried again), and its id reaches the List.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_room_opened_while_the_sidecar_was_frozen_is_listed_and_allocated_once_it_answers() {
        let Some(sdk) = SdkServer::start(Some(&[]), 0).await else {
            return;
        };
        let server = sdk.serve(&[]);
        sdk.until_state("Ready").await;
        send_signal(sdk.child.id(), "STOP");
        let _erin = server.join("erin", "while-frozen").await;
        // Longer than an SDK call's bound (5 s): the Allocate() in flight fails.
        tokio::time::sleep(Duration::from_secs(7)).await;
        send_signal(sdk.child.id(), "CONT");
        sdk.until_state("Allocated").await;
        sdk.until(
            "the List",
            Duration::from_secs(5),
            || sdk.list(),
            (vec!["while-frozen".to_owned()], 5),
        )
        .await;
    }

    /// SIGTERM while the sidecar is frozen: `Shutdown()` goes out when the stop
    /// begins, not after whatever the lifecycle was waiting for, and reaches
    /// Agones once the sidecar answers again; the server still exits 0 in time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_while_the_sidecar_is_frozen_still_says_shutdown() {
        let Some(sdk) = SdkServer::start(Some(&[]), 0).await else {
            return;
        };
        let mut server = sdk.serve(&[]);
        sdk.until_state("Ready").await;
        send_signal(sdk.child.id(), "STOP");
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.signal("TERM");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        send_signal(sdk.child.id(), "CONT");
        assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
        sdk.until_state("Shutdown").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_sdk_error_is_logged_with_its_grpc_code_and_message() {
        // A fleet that declares only the Counter, and a server left at
        // `--agones-rooms list`: the log says what the SDK server said.
        let Some(sdk) = SdkServer::start(None, 0).await else {
            return;
        };
        let server = sdk.serve(&[]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.logs().contains("cannot read the `rooms` List") {
            assert!(Instant::now() < deadline, "{}", server.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let logs = server.logs();
        let line = logs
            .lines()
            .find(|line| line.contains("cannot read the `rooms` List"))
            .unwrap();
        assert!(line.contains("gRPC Unknown (2)"), "{line}");
        assert!(line.contains("not found"), "{line}");
        assert!(line.contains("spec.template.spec.lists"), "{line}");
        // Said once per streak, not at every health interval.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(
            server
                .logs()
                .matches("cannot read the `rooms` List")
                .count(),
            1
        );
    }
}
