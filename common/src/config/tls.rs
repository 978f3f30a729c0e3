//! The TLS settings: the levels of outgoing TLS, a destination's rule, and the server's
//! certificates, as `[tls]` is read into them.

use super::build::Cx;
use super::{raw, ConfigError};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TlsPolicy {
    /// Never TLS.
    None,
    /// STARTTLS when offered; a failed handshake falls back to plain text.
    May,
    /// TLS or defer; any certificate.
    Encrypt,
    /// TLS with a certificate that chains to a trusted root and names the host connected to
    /// (the MX name, or the relay's).
    Verify,
    /// As verify, the certificate naming the next-hop domain or the configured names.
    Secure,
    /// DANE (RFC 7672) where the MX hosts have DNSSEC-signed TLSA records, else `may`.
    Dane,
    /// DANE or nothing: a host without usable TLSA records is not used.
    DaneOnly,
}

impl TlsPolicy {
    pub(super) fn parse(s: &str) -> Option<TlsPolicy> {
        match s {
            "none" => Some(TlsPolicy::None),
            "may" => Some(TlsPolicy::May),
            "encrypt" => Some(TlsPolicy::Encrypt),
            "verify" => Some(TlsPolicy::Verify),
            "secure" => Some(TlsPolicy::Secure),
            "dane" => Some(TlsPolicy::Dane),
            "dane-only" => Some(TlsPolicy::DaneOnly),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TlsPolicy::None => "none",
            TlsPolicy::May => "may",
            TlsPolicy::Encrypt => "encrypt",
            TlsPolicy::Verify => "verify",
            TlsPolicy::Secure => "secure",
            TlsPolicy::Dane => "dane",
            TlsPolicy::DaneOnly => "dane-only",
        }
    }

    /// Whether the peer's certificate is checked against trusted roots.
    pub fn authenticates(self) -> bool {
        matches!(self, TlsPolicy::Verify | TlsPolicy::Secure)
    }

    /// Whether TLSA records are looked up for the hosts.
    pub fn dane(self) -> bool {
        matches!(self, TlsPolicy::Dane | TlsPolicy::DaneOnly)
    }
}

/// The TLS policy of one destination: its level, the CA file to trust, and for `secure` the
/// names the certificate may carry (empty: the next-hop domain).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TlsRule {
    pub level: TlsPolicy,
    pub ca_file: Option<PathBuf>,
    pub names: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Other certificates by the name a client asks for (SNI), lower case.
    pub sni: BTreeMap<String, (PathBuf, PathBuf)>,
    /// Client certificates are asked for, and checked against these CAs (PEM).
    pub client_ca: Option<PathBuf>,
    /// Clients whose certificate verifies for one of these names may relay, lower case.
    pub relay_clients: Vec<String>,
}

/// `[tls]`: the server's certificates, by name, and the clients it trusts to relay.
pub(super) fn section(t: Option<raw::RawTls>, cx: &Cx) -> Result<Option<Tls>, ConfigError> {
    let resolve = |p: &str| cx.resolve(p);
    let tls = match t {
        Some(t) => {
            if !t.relay_clients.is_empty() && t.client_ca.is_none() {
                return Err(cx.err(
                    "tls.relay_clients",
                    "needs tls.client_ca: a client certificate is trusted only when it verifies"
                        .into(),
                ));
            }
            Some(Tls {
                cert: resolve(&t.cert),
                key: resolve(&t.key),
                sni: t
                    .sni
                    .iter()
                    .map(|(name, p)| {
                        let name = name.trim_end_matches('.').to_ascii_lowercase();
                        (name, (resolve(&p.cert), resolve(&p.key)))
                    })
                    .collect(),
                client_ca: t.client_ca.as_deref().map(&resolve),
                relay_clients: t
                    .relay_clients
                    .iter()
                    .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
                    .collect(),
            })
        }
        None => None,
    };
    Ok(tls)
}
