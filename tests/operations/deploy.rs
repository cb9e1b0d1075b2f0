//! The manifests in `deploy/` hold values the server depends on: its port, the
//! probe paths, a grace period that covers its shutdown, the Agones `rooms`
//! Counter and its capacity. Each is checked here against the server's own flag
//! parsing (the container's `args` through `Cli`), and the Deployment's probes
//! against a server started with the manifest's arguments.

use std::time::Duration;

use clap::Parser;
use contract::config::{Cli, Config, Host, RoomsModel, Secret};
use yaml_rust2::{Yaml, YamlLoader};

/// Every document of a manifest file.
fn load(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The one document of `kind` in `docs`.
fn kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    let found: Vec<&Yaml> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

fn int(value: &Yaml, what: &str) -> i64 {
    value
        .as_i64()
        .unwrap_or_else(|| panic!("{what}: not an integer: {value:?}"))
}

fn text<'a>(value: &'a Yaml, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: not a string: {value:?}"))
}

/// The configuration the server would run with, given the container's `args`
/// (and its own defaults for everything else).
fn server_config(container: &Yaml) -> (Config, Vec<String>) {
    let args: Vec<String> = container["args"]
        .as_vec()
        .expect("container args")
        .iter()
        .map(|a| text(a, "arg").to_owned())
        .collect();
    let mut cli =
        Cli::try_parse_from(std::iter::once("session-server".to_owned()).chain(args.clone()))
            .unwrap_or_else(|e| panic!("the manifest's args do not parse: {e}"));
    // The secret comes from a Kubernetes Secret; any long one does here.
    cli.serve.jwt_secret = Some(Secret("a-secret-from-a-kubernetes-secret-0123".into()));
    (
        cli.serve
            .validate(&Host::default())
            .expect("the manifest's args validate"),
        args,
    )
}

/// `"2"`, `2` or `"2000m"` CPUs.
fn cpus(value: &Yaml) -> f64 {
    match value {
        Yaml::Integer(n) => *n as f64,
        Yaml::String(s) => match s.strip_suffix('m') {
            Some(milli) => milli.parse::<f64>().unwrap() / 1000.0,
            None => s.parse().unwrap(),
        },
        other => panic!("cpu: {other:?}"),
    }
}

/// Resident memory of one full room (1,000 shapes at the 12 KiB cap) across
/// every process while a member drags a shape (its peak), and of an idle
/// server (2 workers), rounded up from what `loadgen memory` measured
/// (BENCHMARKS.md, "Memory per room": 81–91 MiB a room being edited, 50–52
/// at rest, 21.3 MiB idle; with members that take compressed snapshots and a
/// board of random CJK text, which compresses least, 98 MiB).
const FULL_ROOM_MIB: u64 = 100;
const IDLE_SERVER_MIB: u64 = 22;

/// The container's memory limit holds `--max-rooms` full rooms below the share
/// of it at which the server refuses new rooms (it reads the limit from its
/// cgroup), so a full server says 503 and the OOM killer never has to choose.
fn check_memory(container: &Yaml, config: &Config) {
    let limit = text(
        &container["resources"]["limits"]["memory"],
        "resources.limits.memory",
    );
    let limit = contract::config::parse_memory_size(limit).unwrap() >> 20;
    let needed = IDLE_SERVER_MIB + config.max_rooms as u64 * FULL_ROOM_MIB;
    let refused_from = limit as f64 * supervisor::ROOMS_REFUSED_AT;
    assert!(
        needed as f64 <= refused_from,
        "{} full rooms need {needed} MiB; the limit of {limit} MiB refuses new rooms from {refused_from:.0} MiB",
        config.max_rooms
    );
}

/// The pod's grace period covers the server's whole shutdown, with a margin.
fn check_grace(pod_spec: &Yaml, config: &Config) {
    let grace = int(
        &pod_spec["terminationGracePeriodSeconds"],
        "terminationGracePeriodSeconds",
    );
    assert!(
        Duration::from_secs(grace as u64) >= config.shutdown_grace + Duration::from_secs(1),
        "terminationGracePeriodSeconds {grace} s does not cover --shutdown-grace-ms {:?}",
        config.shutdown_grace
    );
}

#[test]
fn the_agones_fleet_matches_the_server() {
    let docs = load("deploy/agones/fleet.yaml");
    let fleet = kind(&docs, "Fleet");
    assert_eq!(text(&fleet["apiVersion"], "apiVersion"), "agones.dev/v1");
    let gs = &fleet["spec"]["template"]["spec"];
    let pod = &gs["template"]["spec"];
    let containers = pod["containers"].as_vec().expect("containers");
    assert_eq!(containers.len(), 1);
    let (config, _) = server_config(&containers[0]);

    // The game server's port is the one the server listens on.
    let ports = gs["ports"].as_vec().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(
        int(&ports[0]["containerPort"], "containerPort"),
        i64::from(config.port)
    );
    assert_eq!(text(&ports[0]["protocol"], "protocol"), "TCP");

    // Health: several of the server's pings fit in one period (default interval
    // 2 s unless the args say otherwise).
    let agones = Cli::try_parse_from(["session-server", "--agones"])
        .unwrap()
        .serve
        .agones_health_interval_ms;
    let period_ms = int(&gs["health"]["periodSeconds"], "periodSeconds") * 1000;
    assert!(
        period_ms >= 2 * agones as i64,
        "health.periodSeconds {period_ms} ms < two Health() intervals of {agones} ms"
    );
    assert!(int(&gs["health"]["failureThreshold"], "failureThreshold") >= 2);

    // The `rooms` List: capacity = the server's room limit, starting empty,
    // and the server keeps the List (not the Counter) by default.
    let rooms = &gs["lists"]["rooms"];
    assert_eq!(rooms["values"].as_vec().map(Vec::len), Some(0));
    assert_eq!(
        int(&rooms["capacity"], "rooms.capacity"),
        config.max_rooms as i64,
        "the rooms List's capacity must be the server's --max-rooms"
    );
    let (_, args) = server_config(&containers[0]);
    let cli =
        Cli::try_parse_from(std::iter::once("session-server".to_owned()).chain(args)).unwrap();
    assert_eq!(cli.serve.agones_rooms, RoomsModel::List);

    check_grace(pod, &config);
    // A lifetime no longer than GameFabric advises.
    let lifetime = cli
        .serve
        .agones_max_lifetime_secs
        .expect("a maximum lifetime");
    assert!(lifetime <= 24 * 3600, "{lifetime} s");
    // One core per worker.
    assert_eq!(
        cpus(&containers[0]["resources"]["requests"]["cpu"]),
        config.workers as f64
    );
    check_memory(&containers[0], &config);
}

#[test]
fn the_autoscaler_and_the_allocation_use_the_fleet_s_rooms_list() {
    let fleet_docs = load("deploy/agones/fleet.yaml");
    let fleet = kind(&fleet_docs, "Fleet");
    let fleet_name = text(&fleet["metadata"]["name"], "fleet name");

    let docs = load("deploy/agones/fleetautoscaler.yaml");
    let autoscaler = kind(&docs, "FleetAutoscaler");
    assert_eq!(
        text(&autoscaler["spec"]["fleetName"], "fleetName"),
        fleet_name
    );
    let policy = &autoscaler["spec"]["policy"];
    assert_eq!(text(&policy["type"], "policy.type"), "List");
    assert_eq!(text(&policy["list"]["key"], "list.key"), "rooms");
    let capacity = int(
        &fleet["spec"]["template"]["spec"]["lists"]["rooms"]["capacity"],
        "capacity",
    );
    let buffer = int(&policy["list"]["bufferSize"], "bufferSize");
    assert!(buffer >= 1 && buffer <= int(&policy["list"]["maxCapacity"], "maxCapacity"));
    // Capacities are whole servers' worth of rooms.
    assert_eq!(
        int(&policy["list"]["minCapacity"], "minCapacity") % capacity,
        0
    );
    assert_eq!(
        int(&policy["list"]["maxCapacity"], "maxCapacity") % capacity,
        0
    );

    let docs = load("deploy/agones/allocation.yaml");
    let allocation = kind(&docs, "GameServerAllocation");
    let spec = &allocation["spec"];
    let selectors = spec["selectors"].as_vec().expect("selectors");
    // The room's own server first (its List holds the room, Allocated or
    // Ready), then Allocated servers with a free place, then Ready ones.
    let states: Vec<&str> = selectors
        .iter()
        .map(|s| text(&s["gameServerState"], "gameServerState"))
        .collect();
    assert_eq!(states, ["Allocated", "Ready", "Allocated", "Ready"]);
    for selector in selectors {
        assert_eq!(
            text(&selector["matchLabels"]["agones.dev/fleet"], "fleet label"),
            fleet_name
        );
    }
    let room = text(
        &selectors[0]["lists"]["rooms"]["containsValue"],
        "containsValue",
    );
    assert_eq!(
        text(
            &selectors[1]["lists"]["rooms"]["containsValue"],
            "containsValue"
        ),
        room
    );
    for selector in &selectors[2..] {
        assert_eq!(
            int(&selector["lists"]["rooms"]["minAvailable"], "minAvailable"),
            1
        );
    }
    // The room's id goes into the chosen server's List.
    let added = spec["lists"]["rooms"]["addValues"]
        .as_vec()
        .expect("addValues");
    assert_eq!(added.len(), 1);
    assert_eq!(text(&added[0], "addValues[0]"), room);
    // Fullest first (the fewest free places), so other servers empty out.
    let priorities = spec["priorities"].as_vec().expect("priorities");
    assert_eq!(text(&priorities[0]["type"], "priority type"), "List");
    assert_eq!(text(&priorities[0]["key"], "priority key"), "rooms");
    assert_eq!(text(&priorities[0]["order"], "priority order"), "Ascending");
}

#[tokio::test]
async fn the_kubernetes_deployment_matches_the_server_and_its_probes_answer() {
    let docs = load("deploy/kubernetes/session-server.yaml");
    let deployment = kind(&docs, "Deployment");
    let service = kind(&docs, "Service");
    let claim = kind(&docs, "PersistentVolumeClaim");
    let spec = &deployment["spec"];
    // A room lives in one process: one replica behind the Service, and the old
    // pod gone (its data folder unlocked) before the new one starts.
    assert_eq!(int(&spec["replicas"], "replicas"), 1);
    assert_eq!(text(&spec["strategy"]["type"], "strategy"), "Recreate");
    let pod = &spec["template"]["spec"];
    let container = &pod["containers"][0];
    let (config, args) = server_config(container);
    check_grace(pod, &config);
    check_memory(container, &config);

    let port = &container["ports"][0];
    assert_eq!(
        int(&port["containerPort"], "containerPort"),
        i64::from(config.port)
    );
    let port_name = text(&port["name"], "port name");
    assert_eq!(
        text(&service["spec"]["ports"][0]["targetPort"], "targetPort"),
        port_name
    );
    assert_eq!(
        service["spec"]["selector"]["app"],
        spec["template"]["metadata"]["labels"]["app"]
    );
    assert_eq!(
        spec["selector"]["matchLabels"]["app"],
        spec["template"]["metadata"]["labels"]["app"]
    );
    // The store's folder is the claim, mounted where the image keeps its data.
    assert_eq!(
        text(
            &pod["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "claimName"
        ),
        text(&claim["metadata"]["name"], "claim name")
    );
    assert_eq!(
        text(&container["volumeMounts"][0]["mountPath"], "mountPath"),
        "/app/data"
    );

    let readiness = text(
        &container["readinessProbe"]["httpGet"]["path"],
        "readiness path",
    );
    let liveness = text(
        &container["livenessProbe"]["httpGet"]["path"],
        "liveness path",
    );
    assert_eq!(readiness, "/readyz");
    assert_eq!(liveness, "/healthz");
    // The probes go to the internal port (its own connections: they answer
    // while clients hold every place of the main one), which the Service
    // leaves out.
    let internal = container["ports"]
        .as_vec()
        .expect("ports")
        .iter()
        .find(|p| p["name"].as_str() == Some("internal"))
        .expect("an internal port");
    assert_eq!(
        Some(int(&internal["containerPort"], "internal containerPort") as u16),
        config.internal_port,
        "the internal port is the server's --internal-port"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            text(&container[probe]["httpGet"]["port"], "probe port"),
            "internal"
        );
    }
    assert_eq!(service["spec"]["ports"].as_vec().map(Vec::len), Some(1));
    // The probes answer 200, on GET as the kubelet sends them, from a server
    // started with the manifest's arguments (its internal port moved to a
    // free one).
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let manifest_port = config.internal_port.unwrap().to_string();
    let args: Vec<&str> = args
        .iter()
        .map(|a| {
            if *a == manifest_port {
                free.as_str()
            } else {
                a.as_str()
            }
        })
        .collect();
    let server =
        crate::support::Server::start_raw(&args, &[("JWT_SECRET", crate::support::SECRET)]);
    for path in [readiness, liveness] {
        let (status, body) = server.get_at(free.parse().unwrap(), path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
}
