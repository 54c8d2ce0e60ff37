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
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")).unwrap();
        let mut b = Self { port, dir, child: None };
        b.spawn(&bin);
        Some(b)
    }

    fn spawn(&mut self, bin: &PathBuf) {
        let log = std::fs::File::create(self.dir.path().join("broker.log")).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting mosquitto");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("mosquitto did not start: {}", std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default());
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn(&mosquitto().unwrap());
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

