//! A real Mosquitto broker for the MQTT tests, on a free loopback port.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A Mosquitto process on 127.0.0.1:<port>, killed on drop.
pub struct Broker {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Broker {
    pub fn start() -> Option<Self> {
        let bin = mosquitto()?;
        // Mosquitto cannot bind port 0 and say which it got, so the port is probed first; a
        // test running beside this one may take it in between, and then another is tried.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut b = Self { port, dir: tempfile::tempdir().unwrap(), child: None };
            match b.spawn(&bin) {
                Ok(()) => return Some(b),
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("mosquitto did not start:\n{log}"),
            }
        }
        panic!("mosquitto found no free port in 5 tries");
    }

    /// Starts mosquitto on `self.port` and waits for its "running" line, which it writes only
    /// once its listener is bound; a connection alone could reach another test's broker on a
    /// port this one failed to bind. Errs with the broker's log if it exits first.
    fn spawn(&mut self, bin: &PathBuf) -> Result<(), String> {
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(&conf, format!("listener {} 127.0.0.1\nallow_anonymous true\npersistence false\n", self.port)).unwrap();
        let log_path = self.dir.path().join("broker.log");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("starting mosquitto");
        self.child = Some(child);
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        for _ in 0..200 {
            if log().contains(" running") && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                self.child = None;
                return Err(log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("no 'running' line in 10 s:\n{}", log()))
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the broker and starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(log) = self.spawn(&mosquitto().unwrap()) {
            panic!("mosquitto did not restart on port {}:\n{log}", self.port);
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The broker binary; under CI a missing one is a failure, never a skip.
pub fn mosquitto() -> Option<PathBuf> {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"] {
        if std::path::Path::new(p).exists() {
            return Some(PathBuf::from(p));
        }
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("mosquitto is not installed; scripts/bootstrap-system installs it (apt-get install mosquitto)");
    }
    eprintln!("SKIPPED: mosquitto is not installed (apt-get install mosquitto)");
    None
}

