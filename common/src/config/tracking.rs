//! Tracked sending: what trusted submitters may ask (`[msp]`), and where returned reports
//! arrive and what is done about them (`[tracking]`, `[tracking.imap]`).

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
