//! TLS for the SMTP client. Between MTAs TLS is opportunistic by default (RFC 3207,
//! Postfix's `may` and `encrypt`): it protects against passive listening, and certificates
//! are not checked, since MX hosts rarely have one that names them. At `verify` and
//! `secure`, and for a smarthost that gets credentials, the certificate must chain to a
//! trusted root and carry the expected name, or nothing is sent.

use crate::dane::Tlsa;
use qms_common::conn::Stream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WantsClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, ConfigBuilder, DigitallySignedStruct, SignatureScheme,
    StreamOwned,
};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Takes any certificate; checks only the handshake's signatures (which DANE's verifier
/// borrows too).
#[derive(Debug)]
pub(crate) struct Opportunistic(pub(crate) Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Opportunistic {
    fn verify_server_cert(
        &self,
        _: &CertificateDer,
        _: &[CertificateDer],
        _: &ServerName,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn builder() -> Result<ConfigBuilder<ClientConfig, WantsClientCert>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Opportunistic(provider))))
}

fn config() -> Result<Arc<ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| Ok(Arc::new(builder()?.with_no_client_auth())))
        .clone()
}

/// A configuration that presents a client certificate (a smarthost that asks for one).
fn with_client_cert(cert: &Path, key: &Path) -> Result<Arc<ClientConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("cannot read client certificate {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read client key {}: {e}", key.display()))?;
    let cfg = builder()?
        .with_client_auth_cert(certs, key)
        .map_err(|e| format!("client certificate and key do not match: {e}"))?;
    Ok(Arc::new(cfg))
}

/// Checks the chain as webpki does, and the name against any of `names` (`secure` with
/// `match`), not only the name connected to.
#[derive(Debug)]
struct AnyName {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
        _: &ServerName,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut last = rustls::Error::General("no name to match".into());
        for name in &self.names {
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, name, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A configuration that checks the server's certificate against `roots` (the system's, or
/// a `ca_file`), and its name against the host connected to, or any of `names`.
fn verifying(
    ca_file: Option<&Path>,
    names: &[String],
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(qms_common::tls::roots(ca_file)?);
    let b = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let b = if names.is_empty() {
        b.with_root_certificates(roots)
    } else {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| e.to_string())?;
        let names = names
            .iter()
            .filter_map(|n| ServerName::try_from(n.clone()).ok())
            .collect();
        b.dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyName { inner, names }))
    };
    let cfg = match client_cert {
        None => b.with_no_client_auth(),
        Some((cert, key)) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<_, _>>())
                .map_err(|e| format!("cannot read client certificate {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("cannot read client key {}: {e}", key.display()))?;
            b.with_client_auth_cert(certs, key)
                .map_err(|e| format!("client certificate and key do not match: {e}"))?
        }
    };
    Ok(Arc::new(cfg))
}

/// A configuration that checks the server's chain against TLSA records (DANE).
fn dane(records: &[Tlsa], names: &[String]) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(crate::dane::Verifier::new(records, names)))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// How a handshake treats the server's certificate.
#[derive(Clone, Copy)]
pub enum Check<'a> {
    /// Opportunistic: encrypted, not checked (MX hosts).
    None,
    /// Checked against the system's roots, or these certificates; the name against the
    /// host connected to, or (when not empty) any of these names.
    Verify {
        ca: Option<&'a Path>,
        names: &'a [String],
    },
    /// Checked against TLSA records; `names` for DANE-TA.
    Dane {
        records: &'a [Tlsa],
        names: &'a [String],
    },
    /// Not required, but checked as `Verify` would after the handshake, and the result
    /// reported (an MTA-STS policy in `testing` mode).
    Observe {
        ca: Option<&'a Path>,
        names: &'a [String],
    },
}

/// A finished client handshake.
pub struct Done {
    pub stream: Box<dyn Stream>,
    /// `TLSv1.3 with cipher …, subject …, issuer …`.
    pub info: String,
    /// For `Check::Observe`: why the certificate would not have passed.
    pub observed: Option<String>,
}

/// The client handshake.
pub fn connect(
    server: ServerName<'static>,
    mut sock: Box<dyn Stream>,
    client_cert: Option<(&Path, &Path)>,
    check: Check,
) -> Result<Done, String> {
    let cfg = match (check, client_cert) {
        (Check::Verify { ca, names }, cc) => verifying(ca, names, cc)?,
        (Check::Dane { records, names }, _) => dane(records, names)?,
        (Check::None | Check::Observe { .. }, Some((cert, key))) => with_client_cert(cert, key)?,
        (Check::None | Check::Observe { .. }, None) => config()?,
    };
    let mut conn = ClientConnection::new(cfg, server.clone()).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
    }
    let info = qms_common::tls::describe(&conn);
    let observed = match check {
        Check::Observe { ca, names } => would_verify(&conn, ca, names, &server).err(),
        _ => None,
    };
    Ok(Done {
        stream: Box::new(StreamOwned::new(conn, sock)),
        info,
        observed,
    })
}

/// Whether the chain the server sent passes `verify` (for the name connected to, or any of
/// `names`).
fn would_verify(
    conn: &ClientConnection,
    ca: Option<&Path>,
    names: &[String],
    server: &ServerName<'static>,
) -> Result<(), String> {
    let certs = conn.peer_certificates().unwrap_or_default();
    let (ee, rest) = certs
        .split_first()
        .ok_or("the server sent no certificate")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(qms_common::tls::roots(ca)?);
    let pkix = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| e.to_string())?;
    let mut candidates: Vec<ServerName> = names
        .iter()
        .filter_map(|n| ServerName::try_from(n.clone()).ok())
        .collect();
    if candidates.is_empty() {
        candidates.push(server.clone());
    }
    let mut last = String::new();
    for name in &candidates {
        match pkix.verify_server_cert(ee, rest, name, &[], UnixTime::now()) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}
