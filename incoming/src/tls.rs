//! TLS for the SMTP listeners (rustls): the server config from PEM files, and the handshake
//! that turns a plain stream into an encrypted one (STARTTLS, or at once for port 465's role).

use qms_common::conn::Stream;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use std::collections::HashMap;
use std::sync::Arc;

/// Loads `[tls] cert` and `key`, and those of `[tls.sni]`; the error names the file.
pub fn server_config(tls: &qms_common::config::Tls) -> Result<Arc<ServerConfig>, String> {
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut pems = vec![(read(&tls.cert)?, read(&tls.key)?)];
    for (cert, key) in tls.sni.values() {
        pems.push((read(cert)?, read(key)?));
    }
    from_pem(tls, &pems)
}

/// One certificate chain and its key, from PEM text; the error names the files.
fn certified(
    files: (&std::path::Path, &std::path::Path),
    pem: &(Vec<u8>, Vec<u8>),
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, String> {
    let (cert_file, key_file) = (files.0.display(), files.1.display());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem.0)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{cert_file}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{cert_file}: no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_slice(&pem.1).map_err(|e| format!("{key_file}: {e}"))?;
    CertifiedKey::from_der(certs, key, provider)
        .map(Arc::new)
        .map_err(|e| format!("{cert_file} and {key_file}: {e}"))
}

/// The certificate for the name a client asks for (SNI), else `[tls] cert`.
#[derive(Debug)]
struct BySni {
    default: Arc<CertifiedKey>,
    names: HashMap<String, Arc<CertifiedKey>>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let asked = hello
            .server_name()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase());
        let chosen = asked.and_then(|n| self.names.get(&n));
        Some(chosen.unwrap_or(&self.default).clone())
    }
}

/// The server config from the PEM text of `[tls] cert` and `key`, then of each `[tls.sni]`
/// pair in the config's order (read by the supervisor while it was root, and handed to
/// smtpd, which never is).
pub fn from_pem(
    tls: &qms_common::config::Tls,
    pems: &[(Vec<u8>, Vec<u8>)],
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let files = std::iter::once((tls.cert.as_path(), tls.key.as_path()))
        .chain(tls.sni.values().map(|(c, k)| (c.as_path(), k.as_path())));
    if pems.len() != tls.sni.len() + 1 {
        return Err("the certificates given do not match [tls] and [tls.sni]".into());
    }
    let mut keys = files
        .zip(pems)
        .map(|(f, pem)| certified(f, pem, &provider))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter();
    let default = keys.next().ok_or("no certificate")?;
    let names = tls.sni.keys().cloned().zip(keys).collect();
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni { default, names }));
    Ok(Arc::new(cfg))
}

/// The environment variable that names the descriptors of the certificate and key files the
/// supervisor opened as root: `CERTFD,KEYFD`, then `;CERTFD,KEYFD` for each `[tls.sni]` pair.
pub const TLS_FDS_ENV: &str = "QMS_TLS_FDS";

/// Reads the certificates and keys from the descriptors named in [`TLS_FDS_ENV`], if any.
pub fn inherited(tls: &qms_common::config::Tls) -> Option<Result<Arc<ServerConfig>, String>> {
    use std::os::unix::fs::FileExt;
    let spec = std::env::var(TLS_FDS_ENV).ok()?;
    let read = |fd: &str| -> Result<Vec<u8>, String> {
        let fd: i32 = fd.parse().map_err(|_| format!("bad {TLS_FDS_ENV}"))?;
        // Safety: the supervisor opened this descriptor for us; it is not used elsewhere.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let len = f.metadata().map_err(|e| e.to_string())?.len().min(1 << 20);
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, 0).map_err(|e| e.to_string())?;
        Ok(buf)
    };
    let pems = spec
        .split(';')
        .map(|pair| {
            let (c, k) = pair.split_once(',').ok_or(format!("bad {TLS_FDS_ENV}"))?;
            Ok((read(c)?, read(k)?))
        })
        .collect::<Result<Vec<_>, String>>();
    Some(pems.and_then(|p| from_pem(tls, &p)))
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
