//! DKIM signing (RFC 6376; Ed25519 by RFC 8463) of mail that leaves by SMTP, once the router
//! has made every change to it, so that the signature reaches the recipient intact.
//!
//! The keys are chosen by the domain of the From: field, or its nearest parent domain with
//! keys (`[dkim."example.com"]`), so that the signature aligns with it for DMARC; each
//! selector of the domain adds its own signature (a key rollover). Only mail from trusted
//! submitters (authenticated, local, mynetworks) is signed: a stranger's message that
//! claims one of our domains is never vouched for.

use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use qms_common::Config;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use std::collections::BTreeMap;
use std::path::Path;

/// The header fields signed when present (and signed as absent when not, so that none can
/// be added later): RFC 6376 5.4.1's list. ARC seals sign the same.
pub const SIGNED: &[&str] = &[
    "From",
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-ID",
    "Content-Description",
    "Resent-Date",
    "Resent-From",
    "Resent-Sender",
    "Resent-To",
    "Resent-Cc",
    "Resent-Message-ID",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
];

/// The first of `SIGNED` (From: to Cc:) are listed once more than they occur
/// (oversigned): a second From: or Subject: prepended on the way breaks the signature
/// instead of being shown to the reader.
const OVERSIGNED: usize = 8;

/// The signers of every configured domain, keys loaded once when the router starts.
pub struct Signers {
    by_domain: BTreeMap<String, Vec<DkimSigner<DkimKey, Done>>>,
}

impl Signers {
    /// Reads every `[dkim]` key; an unreadable or unknown key is an error naming its file.
    pub fn load(cfg: &Config) -> Result<Signers, String> {
        let mut by_domain = BTreeMap::new();
        for (domain, selectors) in &cfg.dkim {
            let mut signers = Vec::new();
            for s in selectors {
                let key = read_key(&s.key)?;
                let headers = SIGNED
                    .iter()
                    .chain(&SIGNED[..OVERSIGNED])
                    .map(|h| h.to_string());
                signers.push(
                    DkimSigner::from_key(key)
                        .domain(domain.clone())
                        .selector(s.selector.clone())
                        .headers(headers)
                        .header_canonicalization(Canonicalization::Relaxed)
                        .body_canonicalization(Canonicalization::Relaxed),
                );
            }
            by_domain.insert(domain.clone(), signers);
        }
        Ok(Signers { by_domain })
    }

    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// The message with a DKIM-Signature field per selector of its From: domain before its
    /// header, or None when no key signs for that domain.
    pub fn sign(&self, message: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let Some(domain) = from_domain(message) else {
            return Ok(None);
        };
        let Some(signers) = self.signers_for(&domain) else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(message.len() + 600 * signers.len());
        for signer in signers {
            let sig = signer
                .sign(message)
                .map_err(|e| format!("DKIM signing for {domain}: {e}"))?;
            out.extend_from_slice(sig.to_header().as_bytes());
        }
        out.extend_from_slice(message);
        Ok(Some(out))
    }

    /// The signers of `domain` or of its nearest parent domain that has some.
    fn signers_for(&self, domain: &str) -> Option<&Vec<DkimSigner<DkimKey, Done>>> {
        let mut d = domain;
        loop {
            if let Some(s) = self.by_domain.get(d) {
                return Some(s);
            }
            d = d.split_once('.')?.1;
        }
    }
}

/// A private key in PEM: RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8).
pub fn read_key(path: &Path) -> Result<DkimKey, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{}: not a PEM private key: {e}", path.display()))?;
    if let PrivateKeyDer::Pkcs8(p8) = &der {
        if let Ok(k) = Ed25519Key::from_pkcs8_maybe_unchecked_der(p8.secret_pkcs8_der()) {
            return Ok(DkimKey::Ed25519(k));
        }
    }
    RsaKey::<Sha256>::from_key_der(der)
        .map(DkimKey::Rsa)
        .map_err(|e| format!("{}: not an RSA or Ed25519 key: {e}", path.display()))
}

/// The domain of the first address of the From: field, lowercased.
fn from_domain(message: &[u8]) -> Option<String> {
    let value = qms_common::headers::value(message, "from")?;
    let addr = match (value.rfind('<'), value.rfind('>')) {
        (Some(a), Some(b)) if a < b => &value[a + 1..b],
        _ => value.split(',').next()?.trim(),
    };
    let domain = addr.rsplit_once('@')?.1.trim().trim_end_matches('>');
    (!domain.is_empty()).then(|| domain.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_from_domain_is_found_in_its_forms() {
        let m = |f: &str| format!("Subject: x\r\nFrom: {f}\r\n\r\nbody\r\n").into_bytes();
        assert_eq!(
            from_domain(&m("Ann <ann@Example.COM>")).as_deref(),
            Some("example.com")
        );
        assert_eq!(
            from_domain(&m("ann@sub.example.com")).as_deref(),
            Some("sub.example.com")
        );
        assert_eq!(
            from_domain(&m("\"a, b\" <x@y.test>")).as_deref(),
            Some("y.test")
        );
        assert_eq!(from_domain(b"Subject: none\r\n\r\nx\r\n"), None);
    }
}
