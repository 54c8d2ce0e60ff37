//! The machine a benchmark ran on: board and CPU, cores and their frequencies, governor,
//! temperatures and throttling, memory, kernel. Read from /proc and /sys under a root so tests
//! can use a fake tree.

use std::path::{Path, PathBuf};

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct StaticContext {
    /// /proc/device-tree/model on boards, else the DMI product name.
    pub board: Option<String>,
    pub cpu_model: Option<String>,
    pub cpus_online: usize,
    /// The CPUs this process may run on (its affinity), as the kernel lists them.
    pub cpus_allowed: Option<String>,
    pub governors: Vec<String>,
    pub kernel: Option<String>,
    pub memory_total_mb: Option<f64>,
    pub memory_available_mb: Option<f64>,
}

/// One reading of the things that change: per-CPU frequency, temperatures, throttle counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SystemSample {
    pub cpu_mhz: Vec<f64>,
    pub temps_c: Vec<f64>,
    pub throttle_events: u64,
}

/// Summary of the samples over a window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SystemSummary {
    /// Per CPU: mean MHz over the samples.
    pub cpu_mean_mhz: Vec<f64>,
    pub cpu_min_mhz: Option<f64>,
    pub cpu_max_mhz: Option<f64>,
    pub temp_start_c: Option<f64>,
    pub temp_end_c: Option<f64>,
    pub temp_max_c: Option<f64>,
    /// Throttle events counted during the window (x86 thermal_throttle counters).
    pub throttle_events: u64,
    pub samples: usize,
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().trim_end_matches('\0').to_string()).filter(|s| !s.is_empty())
}

fn cpu_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("sys/devices/system/cpu"))
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    n.starts_with("cpu") && n[3..].chars().all(|c| c.is_ascii_digit()) && n.len() > 3
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort_by_key(|p| p.file_name().and_then(|n| n.to_str()).and_then(|n| n[3..].parse::<u32>().ok()).unwrap_or(0));
    dirs
}

pub fn static_context(root: &Path) -> StaticContext {
    let cpuinfo = read(&root.join("proc/cpuinfo")).unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name") || l.starts_with("Hardware") || l.starts_with("Model"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let meminfo = read(&root.join("proc/meminfo")).unwrap_or_default();
    let mem = |key: &str| {
        meminfo.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()).map(|kb| kb / 1024.0)
    };
    let mut governors: Vec<String> =
        cpu_dirs(root).iter().filter_map(|d| read(&d.join("cpufreq/scaling_governor"))).collect();
    governors.sort();
    governors.dedup();
    StaticContext {
        board: read(&root.join("proc/device-tree/model")).or_else(|| read(&root.join("sys/class/dmi/id/product_name"))),
        cpu_model,
        cpus_online: cpu_dirs(root).len(),
        cpus_allowed: read(&root.join("proc/self/status"))
            .and_then(|s| s.lines().find(|l| l.starts_with("Cpus_allowed_list:")).map(|l| l[18..].trim().to_string())),
        governors,
        kernel: read(&root.join("proc/sys/kernel/osrelease")),
        memory_total_mb: mem("MemTotal:"),
        memory_available_mb: mem("MemAvailable:"),
    }
}

pub fn sample(root: &Path) -> SystemSample {
    let cpus = cpu_dirs(root);
    let cpu_mhz = cpus.iter().filter_map(|d| read(&d.join("cpufreq/scaling_cur_freq"))?.parse::<f64>().ok()).map(|khz| khz / 1e3).collect();
    let throttle_events = cpus
        .iter()
        .filter_map(|d| read(&d.join("thermal_throttle/core_throttle_count"))?.parse::<u64>().ok())
        .sum();
    let mut zones: Vec<PathBuf> = std::fs::read_dir(root.join("sys/class/thermal"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.to_string_lossy().contains("thermal_zone")).collect())
        .unwrap_or_default();
    zones.sort();
    let temps_c = zones.iter().filter_map(|z| read(&z.join("temp"))?.parse::<f64>().ok()).map(|m| m / 1e3).collect();
    SystemSample { cpu_mhz, temps_c, throttle_events }
}

pub fn summarize(samples: &[SystemSample]) -> SystemSummary {
    let hottest = |s: &SystemSample| s.temps_c.iter().cloned().fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
    let ncpu = samples.iter().map(|s| s.cpu_mhz.len()).max().unwrap_or(0);
    let cpu_mean_mhz = (0..ncpu)
        .map(|i| {
            let v: Vec<f64> = samples.iter().filter_map(|s| s.cpu_mhz.get(i).copied()).collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        })
        .collect();
    let all = samples.iter().flat_map(|s| s.cpu_mhz.iter().copied());
    SystemSummary {
        cpu_mean_mhz,
        cpu_min_mhz: all.clone().reduce(f64::min),
        cpu_max_mhz: all.reduce(f64::max),
        temp_start_c: samples.first().and_then(hottest),
        temp_end_c: samples.last().and_then(hottest),
        temp_max_c: samples.iter().filter_map(hottest).reduce(f64::max),
        throttle_events: match (samples.first(), samples.last()) {
            (Some(a), Some(b)) => b.throttle_events.saturating_sub(a.throttle_events),
            _ => 0,
        },
        samples: samples.len(),
    }
}
