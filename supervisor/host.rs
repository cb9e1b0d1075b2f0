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
