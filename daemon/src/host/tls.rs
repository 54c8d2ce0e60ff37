//! TLS set-up shared by every client and listener: one process-wide rustls crypto provider
//! (ring: no C toolchain for aws-lc, no OpenSSL, so cross builds need nothing extra) and the
//! CA bundle a client trusts.

use std::path::{Path, PathBuf};

/// Debian's CA bundle (package ca-certificates): trusted when no CA file is configured.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Installs the process-wide TLS crypto provider (idempotent). Call before building any TLS
/// client or server.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The PEM bytes of `ca_file`, or of the system bundle when it is empty. The error names the
/// file, `setting` (the configuration key), and the fix.
pub fn read_ca(ca_file: &Path, setting: &str) -> Result<Vec<u8>, String> {
    let path = if ca_file.as_os_str().is_empty() { PathBuf::from(SYSTEM_CA_BUNDLE) } else { ca_file.to_path_buf() };
    std::fs::read(&path).map_err(|e| format!("{setting} {}: {e}; install ca-certificates or set {setting}", path.display()))
}
