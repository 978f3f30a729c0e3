//! Sender authentication: what smtpd checks of arriving mail (`[auth_checks]`), the logins
//! of relay hosts (`[relay_auth]`), and the DKIM keys that sign what leaves (`[dkim]`), and how
//! `[auth_checks]` and `[dkim]` are read.

use super::build::Cx;
use super::{raw, ConfigError};
use crate::address::Address;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `[auth_checks]`: what smtpd checks of mail from unauthenticated clients outside
/// mynetworks, and what it refuses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthChecks {
    /// SPF, DKIM and DMARC are checked and an Authentication-Results field added.
    pub enabled: bool,
    /// What a DMARC failure of a domain with `p=reject` gets.
    pub dmarc_reject: DmarcReject,
    /// An SPF `fail` is refused at MAIL FROM.
    pub spf_reject: bool,
    /// Mail DMARC quarantines is put on hold (`qms queue release` lets it go), not only marked.
    pub quarantine_hold: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DmarcReject {
    /// Refused at the end of DATA with 550 5.7.1.
    #[default]
    Honour,
    /// Accepted, marked by the Authentication-Results field.
    Quarantine,
    /// Accepted, marked, never refused.
    Ignore,
}

impl DmarcReject {
    pub fn as_str(self) -> &'static str {
        match self {
            DmarcReject::Honour => "honour",
            DmarcReject::Quarantine => "quarantine",
            DmarcReject::Ignore => "ignore",
        }
    }
}

/// A relay host's login; the password is read from its file when it is used, and sent only
/// over TLS whose certificate is verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayAuth {
    pub user: String,
    pub password_file: PathBuf,
}

/// One DKIM selector of a domain and the file of its private key (PEM: RSA or Ed25519).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DkimSelector {
    pub selector: String,
    pub key: PathBuf,
}

/// `[dkim]`: each signing domain's selectors and keys.
pub(super) fn dkim(
    raw: BTreeMap<String, raw::RawDkimEntry>,
    cx: &Cx,
) -> Result<BTreeMap<String, Vec<DkimSelector>>, ConfigError> {
    let resolve = |p: &str| cx.resolve(p);
    let mut dkim = BTreeMap::new();
    for (domain, entry) in raw {
        let list = match entry {
            raw::RawDkimEntry::One(d) => vec![d],
            raw::RawDkimEntry::Many(v) => v,
        };
        let d = domain.to_ascii_lowercase();
        if Address::new("x", &d).is_err() {
            return Err(cx.err(
                &format!("dkim.{domain:?}"),
                format!("{domain:?} is not a domain"),
            ));
        }
        let mut selectors = Vec::new();
        for s in list {
            let ok = !s.selector.is_empty()
                && s.selector.split('.').all(|l| {
                    !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            if !ok {
                return Err(cx.err(
                    &format!("dkim.{domain:?}.selector"),
                    format!(
                        "{:?} is not a selector (letters, digits, - and dots)",
                        s.selector
                    ),
                ));
            }
            selectors.push(DkimSelector {
                selector: s.selector,
                key: resolve(&s.key),
            });
        }
        dkim.insert(d, selectors);
    }
    Ok(dkim)
}

/// `[auth_checks]`: what SPF, DKIM and DMARC results decide.
pub(super) fn auth_checks(a: raw::RawAuthChecks, cx: &Cx) -> Result<AuthChecks, ConfigError> {
    let dmarc_reject = match a.dmarc_reject.as_deref() {
        None | Some("honour") | Some("honor") => DmarcReject::Honour,
        Some("quarantine") => DmarcReject::Quarantine,
        Some("ignore") => DmarcReject::Ignore,
        Some(o) => {
            return Err(cx.err(
                "auth_checks.dmarc_reject",
                format!("{o:?} is not honour, quarantine or ignore"),
            ))
        }
    };
    let quarantine_hold = match a.quarantine.as_deref() {
        None | Some("mark") => false,
        Some("hold") => true,
        Some(o) => {
            return Err(cx.err(
                "auth_checks.quarantine",
                format!("{o:?} is not mark or hold"),
            ))
        }
    };
    Ok(AuthChecks {
        enabled: a.enabled.unwrap_or(false),
        dmarc_reject,
        spf_reject: a.spf_reject.unwrap_or(false),
        quarantine_hold,
    })
}
