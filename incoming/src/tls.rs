//! TLS for the SMTP listeners (rustls): the server config from PEM files, and the handshake
//! that turns a plain stream into an encrypted one (STARTTLS, or at once for port 465's role).
//!
//! With `[tls] client_ca`, clients are asked for a certificate. Any certificate is taken in
//! the handshake (many MTAs show their server certificate as a client, and refusing it would
//! cost them TLS); it is checked against `client_ca` once the handshake is done, and only a
//! certificate that verifies, for a name of `relay_clients`, lets the client relay.

use qms_common::conn::Stream;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use std::collections::HashMap;
use std::sync::Arc;

/// smtpd's TLS: the server config, and the check of client certificates.
pub struct Server {
    config: Arc<ServerConfig>,
    clients: Option<ClientCerts>,
}

/// `[tls] client_ca` and `relay_clients`.
struct ClientCerts {
    verifier: Arc<dyn ClientCertVerifier>,
    relay: Vec<String>,
}

/// The certificate a client showed.
#[derive(Clone, Debug)]
pub struct ClientCert {
    /// `CN=…, O=…` of its subject.
    pub subject: String,
    /// It chains to `[tls] client_ca` and is valid now.
    pub verified: bool,
    /// Verified, and valid for a name of `[tls] relay_clients`.
    pub relay: bool,
}

/// Asks for a certificate and takes any whose holder proves it has the key; whether it
/// verifies is asked after the handshake (`ClientCerts::check`).
#[derive(Debug)]
struct AskAny(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for AskAny {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

impl ClientCerts {
    fn load(
        tls: &qms_common::config::Tls,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Option<ClientCerts>, String> {
        let Some(ca) = &tls.client_ca else {
            return Ok(None);
        };
        let roots = qms_common::tls::roots_only(ca)?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        Ok(Some(ClientCerts {
            verifier,
            relay: tls.relay_clients.clone(),
        }))
    }

    /// The client's certificate, checked now that the handshake proved its key.
    fn check(&self, conn: &ServerConnection) -> Option<ClientCert> {
        let certs = conn.peer_certificates()?;
        let (end, intermediates) = certs.split_first()?;
        let subject = qms_common::tls::cert_names(end.as_ref())
            .map(|(s, _)| s)
            .unwrap_or_else(|| "(unreadable)".into());
        let verified = self
            .verifier
            .verify_client_cert(end, intermediates, UnixTime::now())
            .is_ok();
        let relay = verified
            && webpki::EndEntityCert::try_from(end).is_ok_and(|cert| {
                self.relay.iter().any(|name| {
                    ServerName::try_from(name.as_str())
                        .is_ok_and(|n| cert.verify_is_valid_for_subject_name(&n).is_ok())
                })
            });
        Some(ClientCert {
            subject,
            verified,
            relay,
        })
    }
}

/// Loads `[tls] cert` and `key`, and those of `[tls.sni]`; the error names the file.
pub fn server_config(tls: &qms_common::config::Tls) -> Result<Arc<Server>, String> {
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
) -> Result<Arc<Server>, String> {
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
    let clients = ClientCerts::load(tls, &provider)?;
    let builder = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &clients {
        Some(c) => builder.with_client_cert_verifier(Arc::new(AskAny(c.verifier.clone()))),
        None => builder.with_no_client_auth(),
    };
    let config = Arc::new(builder.with_cert_resolver(Arc::new(BySni { default, names })));
    Ok(Arc::new(Server { config, clients }))
}

/// The environment variable that names the descriptors of the certificate and key files the
/// supervisor opened as root: `CERTFD,KEYFD`, then `;CERTFD,KEYFD` for each `[tls.sni]` pair.
pub const TLS_FDS_ENV: &str = "QMS_TLS_FDS";

/// Reads the certificates and keys from the descriptors named in [`TLS_FDS_ENV`], if any.
pub fn inherited(tls: &qms_common::config::Tls) -> Option<Result<Arc<Server>, String>> {
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

/// What a handshake gives the session: a description for logs and Received:
/// (`TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384`, and the client's certificate), and the
/// client's certificate as checked.
pub struct Handshake {
    pub info: String,
    pub client: Option<ClientCert>,
}

/// Runs the server handshake on `sock`. Returns the encrypted stream and what it learnt.
pub fn accept(
    server: &Server,
    mut sock: Box<dyn Stream>,
) -> Result<(Box<dyn Stream>, Handshake), String> {
    let mut conn = ServerConnection::new(server.config.clone()).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
    }
    let mut info = qms_common::tls::describe(&conn);
    let client = server.clients.as_ref().and_then(|c| c.check(&conn));
    if let Some(c) = &client {
        info.push_str(match (c.verified, c.relay) {
            (true, true) => ", client certificate verified, may relay",
            (true, false) => ", client certificate verified",
            (false, _) => ", client certificate not verified",
        });
    }
    Ok((
        Box::new(StreamOwned::new(conn, sock)),
        Handshake { info, client },
    ))
}
