//! `mulmd tls init`: a self-signed certificate and key for this machine's names, and the
//! fingerprint a companion app pins instead of trusting a CA.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::host::tls::sha256_fingerprint;

/// Apple's platforms refuse server certificates valid for longer, even self-signed ones.
const VALID_DAYS: i64 = 825;

#[derive(Args)]
pub struct TlsArgs {
    #[command(subcommand)]
    command: TlsCommand,
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Make a self-signed certificate (ECDSA P-256, 825 days) for this machine's names and
    /// print its SHA-256 fingerprint and the [tls] settings that use it.
    Init(InitArgs),
}

#[derive(Args)]
struct InitArgs {
    /// Where cert.pem and key.pem are written.
    #[arg(long, default_value = "/etc/mulmd/tls")]
    dir: PathBuf,
    /// Another name or address clients use for this machine (repeatable), e.g. 192.168.1.20.
    /// Always included: the host name, <host name>.local, localhost, 127.0.0.1 and ::1.
    #[arg(long = "name")]
    names: Vec<String>,
    /// Replace an existing pair (clients that pinned the old fingerprint must pin the new one).
    #[arg(long)]
    force: bool,
    /// The group that may read the key (mode 0640), so the service's user can load it; when
    /// the group does not exist the key stays the owner's alone (0600).
    #[arg(long, default_value = "mulmd")]
    group: String,
}

pub fn run(a: TlsArgs) -> ExitCode {
    let TlsCommand::Init(a) = a.command;
    match init(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mulmd tls init: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init(a: &InitArgs) -> Result<(), String> {
    let (cert_path, key_path) = (a.dir.join("cert.pem"), a.dir.join("key.pem"));
    if !a.force && (cert_path.exists() || key_path.exists()) {
        return Err(format!("{} already holds a certificate or key; add --force to replace them", a.dir.display()));
    }
    let mut names = Vec::new();
    if let Some(host) = crate::host::sys::host_name() {
        names.push(format!("{host}.local"));
        names.push(host);
    }
    names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
    for n in &a.names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let mut params = rcgen::CertificateParams::new(names.clone()).map_err(|e| format!("a name is not a DNS name or an address ({e})"))?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(VALID_DAYS);
    params.distinguished_name.push(rcgen::DnType::CommonName, names[0].clone());
    let key = rcgen::KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
    let cert = params.self_signed(&key).map_err(|e| format!("signing the certificate: {e}"))?;
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    // The key first, owner-only from its creation (then shared with the service's group);
    // the certificate is public.
    let group = group_id(&a.group);
    write(&key_path, key.serialize_pem().as_bytes(), 0o600, group)?;
    write(&cert_path, cert.pem().as_bytes(), 0o644, None)?;
    println!("wrote {} and {} for {}", cert_path.display(), key_path.display(), names.join(", "));
    println!("fingerprint {}", sha256_fingerprint(cert.der()));
    println!("\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"", cert_path.display(), key_path.display());
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file created with `mode`; with `group`, the
/// file is given to it and made group-readable before it takes the final name.
fn write(path: &Path, bytes: &[u8], mode: u32, group: Option<u32>) -> Result<(), String> {
    let tmp = path.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| format!("{}: {e}", tmp.display()))?;
    if let Some(gid) = group {
        use std::os::unix::fs::PermissionsExt;
        rustix::fs::fchown(&f, None, Some(rustix::fs::Gid::from_raw(gid))).map_err(|e| format!("{}: giving it to group {gid}: {e}", tmp.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode | 0o040)).map_err(|e| format!("{}: {e}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The id of group `name` from /etc/group, if it exists.
fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok()).flatten()
    })
}
