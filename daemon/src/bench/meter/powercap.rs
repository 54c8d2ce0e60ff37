//! RAPL through the powercap sysfs class: the CPU package energy counters (µJ).

use std::path::{Path, PathBuf};

use super::{read_u64, EnergyMeter, MeterError, MeterInfo, Method, Scope, WrappingCounter};

struct Zone {
    energy: PathBuf,
    counter: WrappingCounter,
}

/// The sum of every top-level package zone (`intel-rapl:N`, named `package-N`). Subzones
/// (core, uncore, dram) are inside their package and the MMIO interface repeats the package,
/// so neither is added again.
pub struct Powercap {
    info: MeterInfo,
    zones: Vec<Zone>,
}

impl Powercap {
    /// `root` is the filesystem root ("/" in production, a fake tree in tests).
    pub fn open(root: &Path) -> Result<Self, MeterError> {
        let class = root.join("sys/class/powercap");
        let entries = std::fs::read_dir(&class)
            .map_err(|e| MeterError::NotFound(format!("{}: {e}; this machine exposes no RAPL counters", class.display())))?;
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.starts_with("intel-rapl:") && name.matches(':').count() == 1
            })
            .collect();
        dirs.sort();
        let mut zones = Vec::new();
        for dir in dirs {
            let name = std::fs::read_to_string(dir.join("name")).unwrap_or_default();
            if !name.trim().starts_with("package") {
                continue;
            }
            let energy = dir.join("energy_uj");
            read_u64(&energy).map_err(|e| match e {
                MeterError::Read { path, detail } if detail.contains("denied") => MeterError::Read {
                    path,
                    detail: format!("{detail}; energy_uj is readable by root only, run the bench as root"),
                },
                other => other,
            })?;
            let range = read_u64(&dir.join("max_energy_range_uj")).ok();
            zones.push(Zone { energy, counter: WrappingCounter::new(range) });
        }
        if zones.is_empty() {
            return Err(MeterError::NotFound(format!("{}: no package zone (intel-rapl:N named package-N)", class.display())));
        }
        let source = zones.iter().map(|z| z.energy.display().to_string()).collect::<Vec<_>>().join(" + ");
        Ok(Self {
            info: MeterInfo { backend: "powercap", source, scope: Scope::CpuPackage, method: Method::CounterDiff, resolution_j: 1e-6 },
            zones,
        })
    }
}

impl EnergyMeter for Powercap {
    fn info(&self) -> &MeterInfo {
        &self.info
    }

    fn read(&mut self) -> Result<f64, MeterError> {
        let mut total = 0u128;
        for z in &mut self.zones {
            total += z.counter.add(read_u64(&z.energy)?);
        }
        Ok(total as f64 * 1e-6)
    }

    fn wraps(&self) -> u32 {
        self.zones.iter().map(|z| z.counter.wraps).sum()
    }
}
