//! Energy meters behind one interface: each yields the energy used since it was opened, in
//! joules, and says what it measures (its scope) and how finely (its resolution).
//!
//! Counter meters (RAPL, hwmon energy, battery energy, a cumulative command) are differenced
//! with wraparound handled; power meters (hwmon power or V×I, battery power, a watts command)
//! are integrated over time with the trapezoid rule. Either way the bench sees one cumulative
//! series, and the window and baseline arithmetic never depends on the kind of meter.

mod battery;
mod command;
mod hwmon;
mod manual;
mod powercap;

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

pub use battery::Battery;
pub use command::{Command, CommandUnit};
pub use hwmon::Hwmon;
pub use manual::Manual;
pub use powercap::Powercap;

/// What part of the system a meter sees. Results from different scopes are not comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The CPU package (RAPL): no memory, board, regulators or power supply.
    CpuPackage,
    /// The board's power input (a USB meter in the supply line, an INA2xx on the input rail).
    BoardInput,
    /// The wall socket (a smart plug): includes the power supply's losses.
    WallSocket,
    /// What the battery delivers.
    Battery,
    /// Named by the operator for a command or manual meter.
    Declared,
}

/// How the energy series is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Differences of a cumulative energy counter.
    CounterDiff,
    /// Power readings integrated over time.
    Integrated,
    /// Cumulative readings typed by the operator.
    Manual,
}

#[derive(Debug, Clone, Serialize)]
pub struct MeterInfo {
    pub backend: &'static str,
    /// The sensor(s) read: a sysfs path, chip and label, or the command line.
    pub source: String,
    pub scope: Scope,
    pub method: Method,
    /// The smallest energy step the meter can show, in joules (for integrated power: the
    /// power resolution over one second).
    pub resolution_j: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    #[error("{0}")]
    NotFound(String),
    #[error("reading {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("{0}")]
    Command(String),
}

/// A cumulative energy source.
pub trait EnergyMeter: Send {
    fn info(&self) -> &MeterInfo;

    /// Joules used since the meter was opened, read now. Counter wraps are absorbed; a power
    /// meter integrates since its previous read, so it should be read at a steady rate.
    fn read(&mut self) -> Result<f64, MeterError>;

    /// Counter wraparounds absorbed so far (reported as a flag).
    fn wraps(&self) -> u32 {
        0
    }

    /// True for meters that need the operator (the bench then asks instead of sampling).
    fn is_manual(&self) -> bool {
        false
    }
}

/// Reads a sysfs value as an unsigned integer (µJ, µW, mV, mA...).
pub(crate) fn read_u64(path: &std::path::Path) -> Result<u64, MeterError> {
    let text = std::fs::read_to_string(path).map_err(|e| MeterError::Read { path: path.to_path_buf(), detail: e.to_string() })?;
    text.trim().parse::<u64>().map_err(|_| MeterError::Read {
        path: path.to_path_buf(),
        detail: format!("{:?} is not an unsigned integer", text.trim()),
    })
}

/// Trapezoid integration of power readings into cumulative energy.
#[derive(Debug, Default)]
pub(crate) struct PowerIntegrator {
    last: Option<(Instant, f64)>,
    energy_j: f64,
}

impl PowerIntegrator {
    pub fn add(&mut self, at: Instant, watts: f64) -> f64 {
        if let Some((t, p)) = self.last {
            let dt = at.saturating_duration_since(t).as_secs_f64();
            self.energy_j += (p + watts) / 2.0 * dt;
        }
        self.last = Some((at, watts));
        self.energy_j
    }
}

/// Differences of a counter that wraps at `range` back to 0.
#[derive(Debug)]
pub(crate) struct WrappingCounter {
    first: Option<u64>,
    last: u64,
    total: u128,
    range: Option<u64>,
    pub wraps: u32,
}

impl WrappingCounter {
    pub fn new(range: Option<u64>) -> Self {
        Self { first: None, last: 0, total: 0, range, wraps: 0 }
    }

    /// Adds a raw reading; returns the units counted since the first reading. A decrease is a
    /// wrap when the range is known, else a reset (counted from the new value).
    pub fn add(&mut self, raw: u64) -> u128 {
        match self.first {
            None => self.first = Some(raw),
            Some(_) if raw >= self.last => self.total += (raw - self.last) as u128,
            Some(_) => {
                self.wraps += 1;
                match self.range {
                    Some(range) => self.total += (range - self.last) as u128 + raw as u128,
                    None => self.total += raw as u128,
                }
            }
        }
        self.last = raw;
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_counter_wrap_is_added_across_the_range() {
        let mut c = WrappingCounter::new(Some(1000));
        assert_eq!(c.add(900), 0);
        assert_eq!(c.add(990), 90);
        assert_eq!(c.add(40), 90 + 10 + 40);
        assert_eq!(c.wraps, 1);
    }

    #[test]
    fn power_is_integrated_with_the_trapezoid_rule() {
        let t0 = Instant::now();
        let mut p = PowerIntegrator::default();
        assert_eq!(p.add(t0, 2.0), 0.0);
        assert!((p.add(t0 + Duration::from_secs(2), 4.0) - 6.0).abs() < 1e-9);
        assert!((p.add(t0 + Duration::from_secs(3), 4.0) - 10.0).abs() < 1e-9);
    }
}
