//! A battery's fuel gauge (`power_supply`): power_now (µW) integrated, else the fall of
//! energy_now (µWh). Meaningful only while the battery is discharging.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{read_u64, EnergyMeter, MeterError, MeterInfo, Method, PowerIntegrator, Scope};

enum Source {
    Power(PathBuf, PowerIntegrator),
    Energy { path: PathBuf, first: u64 },
}

pub struct Battery {
    info: MeterInfo,
    source: Source,
}

impl Battery {
    /// `name` picks a supply (e.g. "BAT0"); None takes the first of type Battery.
    pub fn open(root: &Path, name: Option<&str>) -> Result<Self, MeterError> {
        let class = root.join("sys/class/power_supply");
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&class)
            .map_err(|e| MeterError::NotFound(format!("{}: {e}", class.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        dirs.sort();
        let dir = dirs
            .into_iter()
            .find(|d| match name {
                Some(n) => d.file_name().is_some_and(|f| f == n),
                None => std::fs::read_to_string(d.join("type")).map(|t| t.trim() == "Battery").unwrap_or(false),
            })
            .ok_or_else(|| MeterError::NotFound(format!("no battery under {}", class.display())))?;
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        if !status.trim().is_empty() && status.trim() != "Discharging" {
            return Err(MeterError::NotFound(format!(
                "{} is {:?}: a battery gauge measures use only while discharging; unplug the charger",
                dir.display(),
                status.trim()
            )));
        }
        let (source, method, resolution_j) = if dir.join("power_now").exists() {
            (Source::Power(dir.join("power_now"), PowerIntegrator::default()), Method::Integrated, 1e-6)
        } else if dir.join("energy_now").exists() {
            let path = dir.join("energy_now");
            let first = read_u64(&path)?;
            (Source::Energy { path, first }, Method::CounterDiff, 3.6e-3)
        } else {
            return Err(MeterError::NotFound(format!("{} has neither power_now nor energy_now", dir.display())));
        };
        let mut meter = Self {
            info: MeterInfo { backend: "battery", source: dir.display().to_string(), scope: Scope::Battery, method, resolution_j },
            source,
        };
        meter.read()?;
        Ok(meter)
    }
}

impl EnergyMeter for Battery {
    fn info(&self) -> &MeterInfo {
        &self.info
    }

    fn read(&mut self) -> Result<f64, MeterError> {
        Ok(match &mut self.source {
            Source::Power(path, integrator) => integrator.add(Instant::now(), read_u64(path)? as f64 * 1e-6),
            // µWh → J: 1 µWh = 3.6 mJ. The charge falls as energy is used.
            Source::Energy { path, first } => first.saturating_sub(read_u64(path)?) as f64 * 3.6e-3,
        })
    }
}
