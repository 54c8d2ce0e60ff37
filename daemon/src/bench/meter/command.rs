//! Any program as a meter: it is run at each reading and prints one number, either cumulative
//! joules (a smart plug's total, a lab meter) or instantaneous watts (integrated here).

use std::time::Instant;

use super::{EnergyMeter, MeterError, MeterInfo, Method, PowerIntegrator, Scope, WrappingCounter};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandUnit {
    Joules,
    Watts,
}

pub struct Command {
    info: MeterInfo,
    argv: Vec<String>,
    unit: CommandUnit,
    integrator: PowerIntegrator,
    resets: WrappingCounter,
}

impl Command {
    /// `command` is split on whitespace (no shell); `scope` is what the operator says it sees.
    pub fn open(command: &str, unit: CommandUnit, scope: Scope, resolution_j: f64) -> Result<Self, MeterError> {
        let argv: Vec<String> = command.split_whitespace().map(str::to_string).collect();
        if argv.is_empty() {
            return Err(MeterError::Command("the meter command is empty".into()));
        }
        let method = match unit {
            CommandUnit::Joules => Method::CounterDiff,
            CommandUnit::Watts => Method::Integrated,
        };
        let mut meter = Self {
            info: MeterInfo { backend: "command", source: command.to_string(), scope, method, resolution_j },
            argv,
            unit,
            integrator: PowerIntegrator::default(),
            resets: WrappingCounter::new(None),
        };
        meter.read()?;
        Ok(meter)
    }

    fn run(&self) -> Result<f64, MeterError> {
        let out = std::process::Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| MeterError::Command(format!("cannot run meter command {:?}: {e}", self.argv[0])))?;
        if !out.status.success() {
            return Err(MeterError::Command(format!(
                "meter command {:?} failed ({}): {}",
                self.info.source,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let value = text.split_whitespace().next().unwrap_or("");
        value
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| MeterError::Command(format!("meter command printed {:?}, expected one non-negative number", text.trim())))
    }
}

impl EnergyMeter for Command {
    fn info(&self) -> &MeterInfo {
        &self.info
    }

    fn read(&mut self) -> Result<f64, MeterError> {
        let value = self.run()?;
        Ok(match self.unit {
            CommandUnit::Watts => self.integrator.add(Instant::now(), value),
            CommandUnit::Joules => {
                // Counted in microjoules so a reset (the total going down) can be absorbed.
                self.resets.add((value * 1e6).round() as u64) as f64 * 1e-6
            }
        })
    }

    fn wraps(&self) -> u32 {
        self.resets.wraps
    }
}
