//! TLS for the SMTP listeners (rustls): the server config from PEM files, and the handshake
//! that turns a plain stream into an encrypted one (STARTTLS, or at once for port 465's role).

use qms_common::conn::Stream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use std::sync::Arc;

/// Loads `[tls] cert` and `key`; the error names the file.
pub fn server_config(tls: &qms_common::config::Tls) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| format!("{}: {e}", tls.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", tls.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in the file",
            tls.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| format!("{}: {e}", tls.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{} and {}: {e}", tls.cert.display(), tls.key.display()))?;
    Ok(Arc::new(cfg))
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
