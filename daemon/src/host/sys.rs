//! What the machine says about itself. The sysinfo crate answers what it covers well (host
//! name, kernel, CPU brand, memory, this process's resident size); a reader rooted at a
//! directory ([`Tree`]) answers what it lacks (the board's device-tree model, governors,
//! per-core frequencies, throttle counters, thermal zones, the affinity list), so tests can
//! point it at a fake tree.

use std::path::{Path, PathBuf};

use sysinfo::{CpuRefreshKind, MemoryRefreshKind, ProcessRefreshKind, ProcessesToUpdate, RefreshKind, System};

/// This machine's host name.
pub fn host_name() -> Option<String> {
    System::host_name().filter(|n| !n.trim().is_empty())
}

/// The kernel release, e.g. "6.1.0-18-arm64".
pub fn kernel() -> Option<String> {
    System::kernel_version().filter(|k| !k.is_empty())
}

/// The CPU's marketing name ("AMD EPYC 7B13", "Cortex-A76" where the kernel names it).
pub fn cpu_brand() -> Option<String> {
    let s = System::new_with_specifics(RefreshKind::nothing().with_cpu(CpuRefreshKind::nothing()));
    s.cpus().first().map(|c| c.brand().trim().to_string()).filter(|b| !b.is_empty())
}

/// Total and available memory, in MB.
pub fn memory_mb() -> (f64, f64) {
    let s = System::new_with_specifics(RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()));
    (s.total_memory() as f64 / 1048576.0, s.available_memory() as f64 / 1048576.0)
}

/// This process's resident memory now and at its peak, in MB.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessMemory {
    pub rss_mb: Option<f64>,
    pub peak_rss_mb: Option<f64>,
}

pub fn process_memory() -> ProcessMemory {
    let pid = sysinfo::get_current_pid().ok();
    let rss_mb = pid.and_then(|pid| {
        let mut s = System::new();
        s.refresh_processes_specifics(ProcessesToUpdate::Some(&[pid]), true, ProcessRefreshKind::nothing().with_memory());
        s.process(pid).map(|p| p.memory() as f64 / 1048576.0)
    });
    // The high-water mark of this process image (VmHWM), not ru_maxrss: Linux carries that
    // over exec, so a child of a large parent (a Python benchmark driver) reported the
    // parent's peak. ru_maxrss only where /proc is not mounted.
    let hwm_kb = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
    });
    // SAFETY: getrusage writes one plain struct through a valid pointer.
    let peak_kb = hwm_kb.or_else(|| unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut usage) == 0).then_some(usage.ru_maxrss as f64)
    });
    // Linux folds the resident count into the peak only at some events, so the peak can
    // trail the current size read a moment later; the peak is at least the current size.
    let peak_rss_mb = peak_kb.map(|kb| kb / 1024.0).map(|p| rss_mb.map_or(p, |r| p.max(r)));
    ProcessMemory { rss_mb, peak_rss_mb }
}

/// /proc and /sys read under a root directory ("/" on the machine, a fake tree in tests).
#[derive(Debug, Clone)]
pub struct Tree {
    root: PathBuf,
}

impl Tree {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf() }
    }

    /// The file at `rel` (e.g. "proc/device-tree/model") trimmed, or None when it is absent
    /// or empty.
    pub fn read(&self, rel: &str) -> Option<String> {
        read(&self.root.join(rel))
    }

    /// The `sys/devices/system/cpu/cpuN` directories, in CPU order.
    pub fn cpu_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir(self.root.join("sys/devices/system/cpu"))
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter_map(|p| {
                        let n = p.file_name()?.to_str()?.strip_prefix("cpu")?.parse::<u32>().ok()?;
                        Some((n, p))
                    })
                    .collect()
            })
            .unwrap_or_default();
        dirs.sort_by_key(|(n, _)| *n);
        dirs.into_iter().map(|(_, p)| p).collect()
    }

    /// The board's name: the device-tree model on boards, else the DMI product name.
    pub fn board(&self) -> Option<String> {
        self.read("proc/device-tree/model").or_else(|| self.read("sys/class/dmi/id/product_name"))
    }

    /// The frequency governors in use, each once.
    pub fn governors(&self) -> Vec<String> {
        let mut g: Vec<String> = self.cpu_dirs().iter().filter_map(|d| read(&d.join("cpufreq/scaling_governor"))).collect();
        g.sort();
        g.dedup();
        g
    }

    /// The CPUs this process may run on, as the kernel lists them.
    pub fn cpus_allowed(&self) -> Option<String> {
        self.read("proc/self/status")?.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(|l| l.trim().to_string())
    }

    /// Each CPU's current frequency in MHz.
    pub fn cpu_mhz(&self) -> Vec<f64> {
        self.cpu_dirs().iter().filter_map(|d| read(&d.join("cpufreq/scaling_cur_freq"))?.parse::<f64>().ok()).map(|khz| khz / 1e3).collect()
    }

    /// Thermal throttle events counted so far (x86's per-core counters).
    pub fn throttle_events(&self) -> u64 {
        self.cpu_dirs().iter().filter_map(|d| read(&d.join("thermal_throttle/core_throttle_count"))?.parse::<u64>().ok()).sum()
    }

    /// Every thermal zone's temperature in °C.
    pub fn temps_c(&self) -> Vec<f64> {
        let mut zones: Vec<PathBuf> = std::fs::read_dir(self.root.join("sys/class/thermal"))
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.to_string_lossy().contains("thermal_zone")).collect())
            .unwrap_or_default();
        zones.sort();
        zones.iter().filter_map(|z| read(&z.join("temp"))?.parse::<f64>().ok()).map(|m| m / 1e3).collect()
    }
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().trim_end_matches('\0').to_string()).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fake_tree_is_read_where_sysinfo_cannot_reach() {
        let d = tempfile::tempdir().unwrap();
        let w = |rel: &str, text: &str| {
            let p = d.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        w("proc/device-tree/model", "Orangepi 5\0");
        for (cpu, gov, khz) in [(0, "schedutil", 1_800_000), (10, "performance", 2_400_000), (4, "schedutil", 2_400_000)] {
            w(&format!("sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor"), gov);
            w(&format!("sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_cur_freq"), &khz.to_string());
        }
        w("sys/devices/system/cpu/cpufreq/policy0/scaling_governor", "ignored");
        w("sys/class/thermal/thermal_zone0/temp", "45500\n");
        w("proc/self/status", "Name:\tmulmd\nCpus_allowed_list:\t4-7\n");
        let t = Tree::new(d.path());
        assert_eq!(t.board().as_deref(), Some("Orangepi 5"));
        assert_eq!(t.governors(), ["performance", "schedutil"]);
        assert_eq!(t.cpu_mhz(), [1800.0, 2400.0, 2400.0], "cpu0, cpu4, cpu10 in CPU order");
        assert_eq!(t.temps_c(), [45.5]);
        assert_eq!(t.cpus_allowed().as_deref(), Some("4-7"));
        assert_eq!(Tree::new(&d.path().join("nothing")).cpu_dirs().len(), 0);
    }

    #[test]
    fn this_machine_reports_itself() {
        let m = process_memory();
        assert!(m.rss_mb.is_some_and(|r| r > 0.0) && m.peak_rss_mb >= m.rss_mb, "{m:?}");
        let (total, available) = memory_mb();
        assert!(total > 0.0 && available <= total);
        assert!(kernel().is_some());
    }
}
