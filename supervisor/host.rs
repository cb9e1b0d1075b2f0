//! What the settings need from the machine: the CPUs this process may use and
//! the Hathora process's identity (the contract's [`Host`], read here because the
//! contract does no I/O).

use contract::config::{HathoraInfo, Host, cpu_quota};

/// Whether this build has the Agones SDK lifecycle (cargo feature `agones`).
pub const AGONES_BUILT: bool = cfg!(feature = "agones");

/// Reads the host: CPUs from the cgroup quota or the machine, Hathora's
/// variables from the environment.
pub fn detect() -> Host {
    let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    Host {
        cpus: available_cpus(),
        memory_limit: cgroup_memory_limit(),
        hathora: HathoraInfo {
            process_id: var("HATHORA_PROCESS_ID"),
            region: var("HATHORA_REGION"),
            app_id: var("HATHORA_APP_ID"),
        },
    }
}

/// The CPUs this process may use. A cgroup CPU quota (what Hathora's
/// `--requested-cpu` sets) is rounded up, so 0.5 CPU gives one worker.
fn available_cpus() -> usize {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cpu.max").ok();
    let v1 = || {
        let quota = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").ok()?;
        let period = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_period_us").ok()?;
        Some(format!("{} {}", quota.trim(), period.trim()))
    };
    match v2.or_else(v1).and_then(|text| cpu_quota(&text)) {
        // available_parallelism floors the quota; the quota decides when set.
        Some(quota) => quota.ceil().max(1.0) as usize,
        None => cpus,
    }
}

/// The memory limit of this process's cgroup (v2 `memory.max`, v1
/// `memory.limit_in_bytes`), the smallest along its path up to the root of the
/// hierarchy as mounted (a container sees its own cgroup as the root). `None`
/// when none is set (v1 writes "no limit" as a number near 2^63).
fn cgroup_memory_limit() -> Option<u64> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    // "0::/path" (v2), "4:memory:/path" (v1).
    let path_of = |wanted: &dyn Fn(&str) -> bool| {
        groups.lines().find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            wanted(controllers).then(|| path.to_owned())
        })
    };
    let candidates = [
        (path_of(&|c| c.is_empty()), "/sys/fs/cgroup", "memory.max"),
        (
            path_of(&|c| c.split(',').any(|c| c == "memory")),
            "/sys/fs/cgroup/memory",
            "memory.limit_in_bytes",
        ),
    ];
    candidates
        .into_iter()
        .filter_map(|(path, root, file)| {
            let mut dir = std::path::PathBuf::from(root).join(path?.trim_start_matches('/'));
            let mut smallest: Option<u64> = None;
            loop {
                if let Ok(text) = std::fs::read_to_string(dir.join(file))
                    && let Ok(limit) = text.trim().parse::<u64>()
                    && limit < 1 << 60
                {
                    smallest = Some(smallest.map_or(limit, |s| s.min(limit)));
                }
                if dir == std::path::Path::new(root) || !dir.pop() {
                    break;
                }
            }
            smallest
        })
        .min()
}
