//! hwmon sensors, chosen by chip name and channel label (hwmonN numbers change across boots):
//! an energy counter (µJ), else a power reading (µW) integrated, else voltage × current.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{read_u64, EnergyMeter, MeterError, MeterInfo, Method, PowerIntegrator, Scope, WrappingCounter};

enum Source {
    Energy(PathBuf, WrappingCounter),
    Power(PathBuf, PowerIntegrator),
    VoltsAmps { volts: PathBuf, amps: PathBuf, integrator: PowerIntegrator },
}

pub struct Hwmon {
    info: MeterInfo,
    source: Source,
}

impl Hwmon {
    /// Finds chip `chip` (its `name` file) and, when `label` is given, the channel with that
    /// label (`*_label`); otherwise the first channel. `scope` is what that sensor measures.
    pub fn open(root: &Path, chip: &str, label: Option<&str>, scope: Scope) -> Result<Self, MeterError> {
        let class = root.join("sys/class/hwmon");
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&class)
            .map_err(|e| MeterError::NotFound(format!("{}: {e}", class.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        dirs.sort();
        let dir = dirs
            .into_iter()
            .find(|d| std::fs::read_to_string(d.join("name")).map(|n| n.trim() == chip).unwrap_or(false))
            .ok_or_else(|| MeterError::NotFound(format!("no hwmon chip named {chip:?} under {}", class.display())))?;
        let channel = |kind: &str| -> Option<String> {
            let mut names: Vec<String> = std::fs::read_dir(&dir)
                .ok()?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(kind) && n.ends_with("_input"))
                .collect();
            names.sort();
            names.into_iter().map(|n| n.trim_end_matches("_input").to_string()).find(|ch| match label {
                None => true,
                Some(l) => std::fs::read_to_string(dir.join(format!("{ch}_label"))).map(|t| t.trim() == l).unwrap_or(false),
            })
        };
        let input = |ch: &str| dir.join(format!("{ch}_input"));
        let describe = |what: &str| format!("{} ({chip}{}, {what})", dir.display(), label.map(|l| format!(" {l}")).unwrap_or_default());
        let (source, method, resolution_j, text) = if let Some(ch) = channel("energy") {
            (Source::Energy(input(&ch), WrappingCounter::new(None)), Method::CounterDiff, 1e-6, describe(&ch))
        } else if let Some(ch) = channel("power") {
            (Source::Power(input(&ch), PowerIntegrator::default()), Method::Integrated, 1e-6, describe(&ch))
        } else if let (Some(v), Some(a)) = (channel("in"), channel("curr")) {
            let text = describe(&format!("{v} × {a}"));
            (Source::VoltsAmps { volts: input(&v), amps: input(&a), integrator: PowerIntegrator::default() }, Method::Integrated, 1e-6, text)
        } else {
            return Err(MeterError::NotFound(format!(
                "hwmon chip {chip:?} at {} has no energy, power, or voltage and current channel{}",
                dir.display(),
                label.map(|l| format!(" labelled {l:?}")).unwrap_or_default()
            )));
        };
        let mut meter = Self { info: MeterInfo { backend: "hwmon", source: text, scope, method, resolution_j }, source };
        meter.read()?;
        Ok(meter)
    }
}

impl EnergyMeter for Hwmon {
    fn info(&self) -> &MeterInfo {
        &self.info
    }

    fn read(&mut self) -> Result<f64, MeterError> {
        let now = Instant::now();
        Ok(match &mut self.source {
            Source::Energy(path, counter) => counter.add(read_u64(path)?) as f64 * 1e-6,
            Source::Power(path, integrator) => integrator.add(now, read_u64(path)? as f64 * 1e-6),
            Source::VoltsAmps { volts, amps, integrator } => {
                let watts = read_u64(volts)? as f64 * 1e-3 * read_u64(amps)? as f64 * 1e-3;
                integrator.add(now, watts)
            }
        })
    }

    fn wraps(&self) -> u32 {
        match &self.source {
            Source::Energy(_, c) => c.wraps,
            _ => 0,
        }
    }
}
