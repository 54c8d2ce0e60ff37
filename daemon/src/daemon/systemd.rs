//! Talking to systemd (`Type=notify`): READY once the model is warm and the sockets are
//! bound, STATUS lines a person reads in `systemctl status`, STOPPING on shutdown, and a
//! watchdog that vouches for the daemon only while no inference worker is stuck.
//! Outside systemd (no `$NOTIFY_SOCKET`) every call is a no-op.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping: finishing in-flight answers")]);
}

/// When systemd asked for a watchdog (`WatchdogSec=`), pings it at a third of the interval
/// for as long as no worker has been stuck on one request for half the interval. A stuck
/// worker means no ping, so systemd restarts the service. Stops with `stop`.
pub fn spawn_watchdog(engine: Arc<Engine>, stop: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else { return };
    let stall_limit = interval / 2;
    tracing::info!(interval_ms = interval.as_millis() as u64, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval((interval / 3).max(Duration::from_millis(100)));
        let mut warned = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let stalled = engine.stalled_for();
            if stalled < stall_limit {
                warned = false;
                send(&[NotifyState::Watchdog]);
            } else if !warned {
                warned = true;
                tracing::error!(stalled_ms = stalled.as_millis() as u64, "an inference worker is stuck; withholding the watchdog ping so systemd restarts mulmd");
            }
        }
    });
}
