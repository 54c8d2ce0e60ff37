//! TLS set-up shared by every client and listener: one process-wide rustls crypto provider
//! (ring: no C toolchain for aws-lc, no OpenSSL, so cross builds need nothing extra) and the
//! CA bundle a client trusts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// The server side of TLS, shared by every TCP listener (`[tls]`): a certificate chain and its
/// key from PEM files, and optionally a CA whose client certificates are required (mTLS).
/// Loading checks everything a handshake would need, so a bad file fails the start (exit 78)
/// rather than the first client.
#[derive(Clone)]
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
    /// SHA-256 of the leaf certificate (DER): what a client pins.
    pub fingerprint: String,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTls {{ fingerprint: {}, mtls: {} }}", self.fingerprint, self.client_ca_pem.is_some())
    }
}

impl ServerTls {
    /// None when `cert_file` and `key_file` are both empty (plain TCP). Errors name the setting,
    /// the file and the fix.
    pub fn load(cert_file: &Path, key_file: &Path, client_ca_file: &Path) -> Result<Option<Self>, String> {
        if cert_file.as_os_str().is_empty() && key_file.as_os_str().is_empty() {
            return Ok(None);
        }
        let read = |setting: &str, p: &Path| std::fs::read(p).map_err(|e| format!("{setting} {}: {e}; make one with `mulmd tls init`", p.display()));
        let cert_pem = read("tls.cert_file", cert_file)?;
        let key_pem = read("tls.key_file", key_file)?;
        let client_ca_pem = if client_ca_file.as_os_str().is_empty() { None } else { Some(read("tls.client_ca_file", client_ca_file)?) };
        let certs = certificates(&cert_pem).map_err(|e| format!("tls.cert_file {}: {e}", cert_file.display()))?;
        let fingerprint = sha256_fingerprint(&certs[0]);
        let tls = Self { cert_pem, key_pem, client_ca_pem, fingerprint };
        tls.rustls().map_err(|e| format!("tls.cert_file {} with tls.key_file {}: {e}", cert_file.display(), key_file.display()))?;
        Ok(Some(tls))
    }

    /// For the HTTP listeners: rustls with ALPN for HTTP/2 and HTTP/1.1.
    pub fn rustls(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::PrivateKeyDer;
        install_crypto();
        let certs = certificates(&self.cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| format!("no private key in PEM form ({e})"))?;
        let builder = rustls::ServerConfig::builder();
        let builder = match &self.client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certificates(pem).map_err(|e| format!("tls.client_ca_file: {e}"))? {
                    roots.add(c).map_err(|e| format!("tls.client_ca_file: {e}"))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build().map_err(|e| format!("tls.client_ca_file: {e}"))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// For the gRPC listener.
    pub fn tonic(&self) -> tonic::transport::ServerTlsConfig {
        let mut c = tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem));
        if let Some(ca) = &self.client_ca_pem {
            c = c.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        c
    }

    /// The certificate's PEM, for a local client that trusts exactly it (`mulmd health`).
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    pub fn mutual(&self) -> bool {
        self.client_ca_pem.is_some()
    }
}

fn certificates(pem: &[u8]) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| format!("not PEM certificates ({e})"))?;
    if certs.is_empty() {
        return Err("holds no certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(certs)
}

/// "SHA256:AB:CD:…", the form browsers and `openssl x509 -fingerprint -sha256` show.
pub fn sha256_fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: Vec<String> = d.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    format!("SHA256:{}", hex.join(":"))
}
