//! Sender authentication: what smtpd checks of arriving mail (`[auth_checks]`), the logins
//! of relay hosts (`[relay_auth]`), and the DKIM keys that sign what leaves (`[dkim]`).

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
