//! The operator as a meter, as the paper measured: they read a USB meter's cumulative energy
//! off its display when asked and type it in (e.g. "152.3 mWh").

use std::io::{BufRead, Write};

use super::{EnergyMeter, MeterError, MeterInfo, Method, Scope};

pub struct Manual {
    info: MeterInfo,
    input: Box<dyn BufRead + Send>,
    prompt: Box<dyn Write + Send>,
    first: Option<f64>,
}

impl Manual {
    /// `resolution_j` is the meter's display step (a UM24C shows 1 mWh = 3.6 J).
    pub fn new(input: Box<dyn BufRead + Send>, prompt: Box<dyn Write + Send>, resolution_j: f64) -> Self {
        Self {
            info: MeterInfo {
                backend: "manual",
                source: "readings typed by the operator".into(),
                scope: Scope::BoardInput,
                method: Method::Manual,
                resolution_j,
            },
            input,
            prompt,
            first: None,
        }
    }
}

/// Parses "152.3 mWh", "0.2 Wh", "540 J", "1.5kJ" into joules.
pub fn parse_energy(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.trim().parse().map_err(|_| format!("{t:?} does not start with a number"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "mwh" => 3.6,
        "wh" => 3600.0,
        "kwh" => 3.6e6,
        "j" => 1.0,
        "kj" => 1e3,
        "" => return Err(format!("{t:?} has no unit; add mWh, Wh, kWh, J or kJ")),
        other => return Err(format!("unknown unit {other:?}; use mWh, Wh, kWh, J or kJ")),
    };
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{t:?} is not a non-negative reading"));
    }
    Ok(value * factor)
}

impl EnergyMeter for Manual {
    fn info(&self) -> &MeterInfo {
        &self.info
    }

    fn is_manual(&self) -> bool {
        true
    }

    /// Asks until a valid reading is typed; the reading counts from the moment it is entered.
    fn read(&mut self) -> Result<f64, MeterError> {
        loop {
            let _ = write!(self.prompt, "Type the meter's cumulative energy now (e.g. 152.3 mWh): ");
            let _ = self.prompt.flush();
            let mut line = String::new();
            let n = self.input.read_line(&mut line).map_err(|e| MeterError::Command(format!("reading the typed value: {e}")))?;
            if n == 0 {
                return Err(MeterError::Command("no reading typed (input closed)".into()));
            }
            match parse_energy(&line) {
                Ok(j) => {
                    let first = *self.first.get_or_insert(j);
                    if j < first {
                        let _ = writeln!(self.prompt, "that is below the first reading ({first:.3} J); type the current total");
                        continue;
                    }
                    return Ok(j - first);
                }
                Err(e) => {
                    let _ = writeln!(self.prompt, "{e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_convert_to_joules() {
        assert_eq!(parse_energy("1 mWh").unwrap(), 3.6);
        assert_eq!(parse_energy(" 0.5Wh\n").unwrap(), 1800.0);
        assert_eq!(parse_energy("12 J").unwrap(), 12.0);
        assert!(parse_energy("12").unwrap_err().contains("no unit"));
        assert!(parse_energy("abc mWh").is_err());
        assert!(parse_energy("5 furlongs").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn typed_readings_are_differenced_and_typos_asked_again() {
        let input = std::io::Cursor::new(b"100 mWh\noops\n90 mWh\n110 mWh\n".to_vec());
        let mut m = Manual::new(Box::new(input), Box::new(std::io::sink()), 3.6);
        assert_eq!(m.read().unwrap(), 0.0);
        assert!((m.read().unwrap() - 36.0).abs() < 1e-9, "the typo and the lower value are asked again");
        assert!(m.read().is_err(), "closed input is an error, not a zero");
    }
}
