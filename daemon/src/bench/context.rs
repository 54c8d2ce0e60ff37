//! The machine a benchmark ran on: board and CPU, cores and their frequencies, governor,
//! temperatures and throttling, memory, kernel, as `host::sys` reads them (the tree under a
//! root, so tests can use a fake one).

use std::path::Path;

use serde::Serialize;

use crate::host::sys::{self, Tree};

#[derive(Debug, Clone, Serialize)]
pub struct StaticContext {
    /// /proc/device-tree/model on boards, else the DMI product name.
    pub board: Option<String>,
    pub cpu_model: Option<String>,
    /// The engine kernels' instruction-set level (`MULMD_KERNELS`, else the best here).
    pub kernels: String,
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

/// The machine as it stands: sysinfo's view of CPU, kernel and memory, and the tree under
/// `root` for the board, cores, governors and affinity.
pub fn static_context(root: &Path) -> StaticContext {
    let tree = Tree::new(root);
    let (total, available) = sys::memory_mb();
    StaticContext {
        board: tree.board(),
        cpu_model: sys::cpu_brand(),
        kernels: crate::engine::kernels::in_use().name().into(),
        cpus_online: tree.cpu_dirs().len(),
        cpus_allowed: tree.cpus_allowed(),
        governors: tree.governors(),
        kernel: sys::kernel(),
        memory_total_mb: Some(total).filter(|t| *t > 0.0),
        memory_available_mb: Some(available).filter(|_| total > 0.0),
    }
}

pub fn sample(root: &Path) -> SystemSample {
    let tree = Tree::new(root);
    SystemSample { cpu_mhz: tree.cpu_mhz(), temps_c: tree.temps_c(), throttle_events: tree.throttle_events() }
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
