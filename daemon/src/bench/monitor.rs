//! A background thread that samples the energy meter (every `period`) and the system (every
//! second) while the bench runs, timestamped in seconds since the bench's origin.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::context::{self, SystemSample};
use super::meter::EnergyMeter;

#[derive(Debug, Default, Clone)]
pub struct Recording {
    /// (seconds since origin, cumulative joules)
    pub energy: Vec<(f64, f64)>,
    /// (seconds since origin, sample)
    pub system: Vec<(f64, SystemSample)>,
    /// Failed meter reads with their time: a sensor that disappeared, a command that failed.
    pub errors: Vec<(f64, String)>,
}

pub struct Monitor {
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<Recording>>,
    handle: Option<JoinHandle<Option<Box<dyn EnergyMeter>>>>,
    pub period: Duration,
    origin: Instant,
}

fn sample_meter(meter: &mut dyn EnergyMeter, origin: Instant, rec: &mut Recording) {
    let r = meter.read();
    let t = origin.elapsed().as_secs_f64();
    match r {
        Ok(j) => rec.energy.push((t, j)),
        Err(e) => rec.errors.push((t, e.to_string())),
    }
}

impl Monitor {
    /// Starts sampling. With `meter` None (or a manual meter, read by the bench itself), only
    /// the system is sampled.
    pub fn start(meter: Option<Box<dyn EnergyMeter>>, root: PathBuf, origin: Instant, period: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut first = Recording::default();
        let mut meter = meter;
        // One reading before returning, so every moment the caller marks after this call lies
        // inside the series.
        if let Some(m) = meter.as_mut() {
            sample_meter(m.as_mut(), origin, &mut first);
        }
        let shared = Arc::new(Mutex::new(first));
        let (s, rec) = (stop.clone(), shared.clone());
        let handle = std::thread::Builder::new()
            .name("mulmd-bench-monitor".into())
            .spawn(move || {
                let mut next_system = Instant::now();
                while !s.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    let t = now.duration_since(origin).as_secs_f64();
                    if let Some(m) = meter.as_mut() {
                        sample_meter(m.as_mut(), origin, &mut rec.lock().unwrap());
                    }
                    if now >= next_system {
                        let sample = context::sample(&root);
                        rec.lock().unwrap().system.push((t, sample));
                        next_system = now + Duration::from_secs(1);
                    }
                    std::thread::sleep(period.saturating_sub(now.elapsed()));
                }
                meter
            })
            .expect("spawning the bench monitor thread");
        Self { stop, shared, handle: Some(handle), period, origin }
    }

    /// What has been recorded so far.
    pub fn snapshot(&self) -> Recording {
        self.shared.lock().unwrap().clone()
    }

    /// Stops sampling and takes a last reading (so the series covers every moment marked
    /// before this call); returns the meter (for its wrap count) and the recording.
    pub fn finish(mut self) -> (Option<Box<dyn EnergyMeter>>, Recording) {
        self.stop.store(true, Ordering::Relaxed);
        let mut meter = self.handle.take().and_then(|h| h.join().ok()).flatten();
        let mut rec = std::mem::take(&mut *self.shared.lock().unwrap());
        if let Some(m) = meter.as_mut() {
            sample_meter(m.as_mut(), self.origin, &mut rec);
        }
        (meter, rec)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
