//! TLS for the SMTP listeners (rustls): the server config from PEM files, and the handshake
//! that turns a plain stream into an encrypted one (STARTTLS, or at once for port 465's role).

use qms_common::conn::Stream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use std::sync::Arc;

/// Loads `[tls] cert` and `key`; the error names the file.
pub fn server_config(tls: &qms_common::config::Tls) -> Result<Arc<ServerConfig>, String> {
    let cert = std::fs::read(&tls.cert).map_err(|e| format!("{}: {e}", tls.cert.display()))?;
    let key = std::fs::read(&tls.key).map_err(|e| format!("{}: {e}", tls.key.display()))?;
    from_pem(tls, &cert, &key)
}

/// The server config from the PEM text of `[tls] cert` and `key` (read by the supervisor
/// while it was root, and handed to smtpd, which never is).
pub fn from_pem(
    tls: &qms_common::config::Tls,
    cert: &[u8],
    key: &[u8],
) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", tls.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in the file",
            tls.cert.display()
        ));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("{}: {e}", tls.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{} and {}: {e}", tls.cert.display(), tls.key.display()))?;
    Ok(Arc::new(cfg))
}

/// The environment variable that names the descriptors of the certificate and key files the
/// supervisor opened as root: `CERTFD,KEYFD`.
pub const TLS_FDS_ENV: &str = "QMS_TLS_FDS";

/// Reads the certificate and key from the descriptors named in [`TLS_FDS_ENV`], if any.
pub fn inherited(tls: &qms_common::config::Tls) -> Option<Result<Arc<ServerConfig>, String>> {
    use std::os::unix::fs::FileExt;
    let spec = std::env::var(TLS_FDS_ENV).ok()?;
    let (c, k) = spec.split_once(',')?;
    let read = |fd: &str| -> Result<Vec<u8>, String> {
        let fd: i32 = fd.parse().map_err(|_| format!("bad {TLS_FDS_ENV}"))?;
        // Safety: the supervisor opened this descriptor for us; it is not used elsewhere.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let len = f.metadata().map_err(|e| e.to_string())?.len().min(1 << 20);
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, 0).map_err(|e| e.to_string())?;
        Ok(buf)
    };
    Some(
        read(c)
            .and_then(|cert| Ok((cert, read(k)?)))
            .and_then(|(c, k)| from_pem(tls, &c, &k)),
    )
}

/// Runs the server handshake on `sock`. Returns the encrypted stream and a description of
/// the session for logs and Received: (`TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384`).
pub fn accept(
    cfg: &Arc<ServerConfig>,
    mut sock: Box<dyn Stream>,
) -> Result<(Box<dyn Stream>, String), String> {
    let mut conn = ServerConnection::new(cfg.clone()).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
    }
    let info = qms_common::tls::describe(&conn);
    Ok((Box::new(StreamOwned::new(conn, sock)), info))
}
