//! Tracked sending: what trusted submitters may ask (`[msp]`), and where returned reports
//! arrive and what is done about them (`[tracking]`, `[tracking.imap]`), and how `[tracking]`
//! is checked and read.

use super::build::Cx;
use super::raw::{self, Secs};
use super::route::parse_hop;
use super::ConfigError;
use crate::address::Address;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `[msp]`: what trusted submitters may ask of the submission pipeline beyond headers.
#[derive(Clone, Debug, Default)]
pub struct Msp {
    /// SASL users and local login names that may send through a smarthost of their own
    /// choice (`BX-MTA-Rem-*`). Nobody by default.
    pub smarthost_users: Vec<String>,
    /// The plugin allow-list: the executables in this directory are what
    /// `BX-MTA-Submission-Pre-Plugins` and `-Post-Plugins` may name. None: no plugins.
    pub plugin_dir: Option<PathBuf>,
    /// Seconds a plugin may run before it is killed.
    pub plugin_timeout: u64,
    /// Certificates to trust for a smarthost, by host name, besides the system's roots.
    /// Credentials go only over TLS whose certificate these or the system's roots verify.
    pub ca_files: BTreeMap<String, PathBuf>,
}

/// Tracked sending: where returned reports arrive and what to do about them.
#[derive(Clone, Debug, Default)]
pub struct Tracking {
    /// The Maildir `qms dsnproc` reads (the envelope address's mailbox).
    pub envelope_maildir: Option<PathBuf>,
    /// Tell the other To/Cc recipients when one hard-fails, for every tracked message
    /// (otherwise only when the message asks with `X-B-Non-Delivery-Notification-Actions`).
    pub co_recipient_notices: bool,
    /// The dedicated envelope address: tracked mail goes out as `envelope+QID-SIG@domain`.
    pub envelope: Option<Address>,
    /// The key that signs VERP tokens (`key`, or the contents of `key_file`).
    pub key: Vec<u8>,
    /// The file `key` was read from, if it came from one.
    pub key_file: Option<PathBuf>,
    /// `[tracking.imap]`: a remote mailbox whose reports are fetched into `envelope_maildir`.
    pub imap: Option<Imap>,
    /// The reasons of hard failures ("user unknown", "has moved", …, and "complaint") that
    /// put a recipient on the suppression list by themselves; empty: only `qms suppress add`.
    pub suppress: Vec<String>,
    /// Seconds of tracking events kept (`keep = "90d"`); older ones are pruned by the tracker.
    /// None: all are kept.
    pub keep: Option<u64>,
    /// `database = "postgresql://…"`: a tracking database shared by a fleet; None: SQLite
    /// under the spool.
    pub database: Option<String>,
    /// The database password, read from this file when connecting (else `PGPASSWORD`).
    pub password_file: Option<PathBuf>,
    /// Certificates that the database server's must chain to (besides the system's), for a
    /// URL with `sslmode=require`.
    pub database_ca_file: Option<PathBuf>,
}

/// A remote IMAP mailbox, reached over TLS from the first byte (IMAPS).
#[derive(Clone, Debug)]
pub struct Imap {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Read when polling, so that only `dsnproc` needs to be able to read it.
    pub password_file: PathBuf,
    pub mailbox: String,
    /// Certificates to trust instead of the system's (a private CA or a self-signed server).
    pub ca_file: Option<PathBuf>,
    /// Seconds between polls.
    pub interval: u64,
}

/// `[tracking]`: the VERP envelope and its key, the IMAP mailbox of reports, the database.
pub(super) fn section(t: raw::RawTracking, cx: &Cx) -> Result<Tracking, ConfigError> {
    let resolve = |p: &str| cx.resolve(p);
    let envelope = match t.envelope.as_deref() {
        Some(a) => Some(Address::parse(a).map_err(|e| cx.err("tracking.envelope", e.to_string()))?),
        None => None,
    };
    let key = match (&t.key, &t.key_file) {
        (_, Some(f)) => std::fs::read(resolve(f))
            .map_err(|e| cx.err("tracking.key_file", format!("cannot read {f}: {e}")))?,
        (Some(k), None) => k.as_bytes().to_vec(),
        (None, None) => Vec::new(),
    };
    if envelope.is_some() && key.len() < 16 {
        return Err(cx.err(
            "tracking.key",
            "a VERP envelope needs a key (key or key_file) of at least 16 bytes".into(),
        ));
    }
    let imap = match t.imap {
        Some(i) => {
            // IMAPS: port 993 unless the server names another.
            let has_port = i
                .server
                .rsplit_once(':')
                .is_some_and(|(_, p)| !p.contains(']'));
            let server = if has_port {
                i.server.clone()
            } else {
                format!("{}:993", i.server)
            };
            let (host, port) =
                parse_hop(&server, 993).map_err(|e| cx.err("tracking.imap.server", e))?;
            if t.envelope_maildir.is_none() {
                return Err(cx.err(
                    "tracking.imap",
                    "IMAP polling fetches into envelope_maildir, which is not set".into(),
                ));
            }
            Some(Imap {
                host,
                port,
                user: i.user,
                password_file: resolve(&i.password_file),
                mailbox: i.mailbox.unwrap_or_else(|| "INBOX".into()),
                ca_file: i.ca_file.as_deref().map(resolve),
                interval: i.interval.map(Secs::get).unwrap_or(60).max(1),
            })
        }
        None => None,
    };
    Ok(Tracking {
        envelope_maildir: t.envelope_maildir.as_deref().map(resolve),
        co_recipient_notices: t.co_recipient_notices.unwrap_or(false),
        envelope,
        key,
        key_file: t.key_file.as_deref().map(resolve),
        imap,
        keep: t.keep.map(Secs::get).filter(|k| *k > 0),
        suppress: t.suppress.unwrap_or_else(|| {
            ["user unknown", "has moved", "complaint"]
                .map(String::from)
                .to_vec()
        }),
        database: t.database.clone(),
        password_file: t.password_file.as_deref().map(resolve),
        database_ca_file: t.database_ca_file.as_deref().map(resolve),
    })
}

/// `[tracking]`'s checks that come before anything else is read.
pub(super) fn checks(t: &raw::RawTracking, cx: &Cx) -> Result<(), ConfigError> {
    if let Some(bad) =
        t.suppress.iter().flatten().find(|r| {
            !r.eq_ignore_ascii_case("complaint") && crate::reason::Reason::parse(r).is_none()
        })
    {
        let words: Vec<&str> = crate::reason::Reason::ALL
            .iter()
            .map(|r| r.as_str())
            .collect();
        return Err(cx.err(
            "tracking.suppress",
            format!(
                "{bad:?} is not \"complaint\" or a reason: {}",
                words.join(", ")
            ),
        ));
    }
    if let Some(db) = &t.database {
        if !db.starts_with("postgresql://") && !db.starts_with("postgres://") {
            return Err(cx.err(
                "tracking.database",
                format!("{db:?} is not a postgresql:// URL"),
            ));
        }
    }
    Ok(())
}
