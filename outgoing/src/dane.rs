//! DANE for SMTP (RFC 7672): a server's certificate checked against its DNSSEC-signed TLSA
//! records instead of public CAs. DANE-EE(3) records match the server's own certificate or
//! key, with no name or date checks; DANE-TA(2) records match a certificate of the chain the
//! server sent, which then acts as the only root, and the name is checked. PKIX usages (0
//! and 1) are not used for SMTP (RFC 7672 3.1.3).

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256, Sha512};
use std::sync::Arc;

/// One TLSA record that qms can use.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Tlsa {
    /// 2 (DANE-TA) or 3 (DANE-EE).
    pub(crate) usage: u8,
    /// 0: the whole certificate; 1: its public key (SubjectPublicKeyInfo).
    pub(crate) selector: u8,
    /// 0: the data itself; 1: SHA-256; 2: SHA-512.
    pub(crate) matching: u8,
    pub(crate) data: Vec<u8>,
}

impl Tlsa {
    /// The record, when qms can use it (RFC 7672 3.1: DANE-TA and DANE-EE, the selectors and
    /// matching types of RFC 6698, data of the right length).
    pub(crate) fn usable(usage: u8, selector: u8, matching: u8, data: &[u8]) -> Option<Tlsa> {
        let length_ok = match matching {
            0 => !data.is_empty(),
            1 => data.len() == 32,
            2 => data.len() == 64,
            _ => false,
        };
        (matches!(usage, 2 | 3) && selector <= 1 && length_ok).then(|| Tlsa {
            usage,
            selector,
            matching,
            data: data.to_vec(),
        })
    }

    /// Whether `cert` is what this record describes.
    fn matches(&self, cert: &CertificateDer) -> bool {
        let selected = match self.selector {
            0 => cert.as_ref().to_vec(),
            _ => match webpki::anchor_from_trusted_cert(cert) {
                Ok(a) => webpki::spki_for_anchor(&a).as_ref().to_vec(),
                Err(_) => return false,
            },
        };
        let digest = match self.matching {
            0 => selected,
            1 => Sha256::digest(&selected).to_vec(),
            _ => Sha512::digest(&selected).to_vec(),
        };
        digest == self.data
    }
}

/// Checks a server's chain against TLSA records; `names` are the reference identifiers for
/// DANE-TA (the MX host, then the next-hop domain).
#[derive(Debug)]
pub(crate) struct Verifier {
    records: Vec<Tlsa>,
    names: Vec<ServerName<'static>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The handshake's signatures are checked as for any TLS session.
    signatures: crate::tls::Opportunistic,
}

impl Verifier {
    pub(crate) fn new(records: &[Tlsa], names: &[String]) -> Verifier {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Verifier {
            records: records.to_vec(),
            names: names
                .iter()
                .filter_map(|n| ServerName::try_from(n.clone()).ok())
                .collect(),
            signatures: crate::tls::Opportunistic(provider.clone()),
            provider,
        }
    }

    /// DANE-TA: `anchor`, a certificate the server sent, as the only root of the chain.
    fn chains_to(
        &self,
        anchor: &CertificateDer,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(anchor.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("TLSA trust anchor: {e}")))?;
        let pkix = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut last = rustls::Error::General("no name to match".into());
        for name in &self.names {
            match pkix.verify_server_cert(end_entity, intermediates, name, &[], now) {
                Ok(_) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
        _: &ServerName,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .records
            .iter()
            .any(|r| r.usage == 3 && r.matches(end_entity))
        {
            return Ok(ServerCertVerified::assertion());
        }
        let mut why = "no TLSA record matches the server's certificate chain".to_string();
        for r in self.records.iter().filter(|r| r.usage == 2) {
            for anchor in intermediates.iter().filter(|c| r.matches(c)) {
                match self.chains_to(anchor, end_entity, intermediates, now) {
                    Ok(()) => return Ok(ServerCertVerified::assertion()),
                    Err(e) => why = format!("the chain to the TLSA trust anchor fails: {e}"),
                }
            }
        }
        Err(rustls::Error::General(why))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dane_usages_with_known_selectors_and_lengths_are_used() {
        assert!(Tlsa::usable(3, 1, 1, &[0; 32]).is_some());
        assert!(Tlsa::usable(2, 0, 2, &[0; 64]).is_some());
        assert!(Tlsa::usable(3, 0, 0, &[1, 2, 3]).is_some());
        // PKIX-TA and PKIX-EE are not for SMTP; selector 2 and a short digest are not usable.
        assert!(Tlsa::usable(1, 1, 1, &[0; 32]).is_none());
        assert!(Tlsa::usable(0, 1, 1, &[0; 32]).is_none());
        assert!(Tlsa::usable(3, 2, 1, &[0; 32]).is_none());
        assert!(Tlsa::usable(3, 1, 1, &[0; 31]).is_none());
    }
}
