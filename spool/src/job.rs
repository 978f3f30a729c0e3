//! The job file: one JSON document per message per queue, holding the request fields of the
//! QMS design (arrival, warning and expiry times, sender, protocol, recipients with state).

use crate::id::QueueId;
use qms_common::address::{reverse_path, Address};
use serde::{Deserialize, Serialize};

pub const JOB_VERSION: u32 = 2;
/// The version of a job that carries its message in its own file (see `message_at`); a
/// job whose message is a file under `msg/` is written as version 1, as before.
pub const INLINE_VERSION: u32 = 2;

/// Where a message came from, for Received: headers, logs and policy.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Client {
    /// Peer IP address, or absent for local injection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helo: Option<String>,
    /// The SASL user of an authenticated session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// TLS version and cipher, when the session was encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    /// The local user who ran `sendmail`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_user: Option<String>,
    /// True when the client may use tracked-sending headers (authenticated, local or mynetworks).
    #[serde(default)]
    pub trusted: bool,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Notify {
    Never,
    Success,
    Failure,
    Delay,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DsnRet {
    Full,
    Hdrs,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RcptState {
    Pending,
    Deferred,
    Delivered,
    Failed,
}

impl RcptState {
    pub fn is_final(self) -> bool {
        matches!(self, RcptState::Delivered | RcptState::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RcptState::Pending => "pending",
            RcptState::Deferred => "deferred",
            RcptState::Delivered => "delivered",
            RcptState::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Recipient {
    pub address: Address,
    /// RFC 3461 ORCPT, as given (`rfc822;addr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
    /// RFC 3461 NOTIFY; empty means the default (failures and delays).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<Notify>,
    pub state: RcptState,
    /// The last reply or error, in plain words, for mailq and error mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// Where the router sent it: `maildir:/path`, `smtp`, `smtp:[host]:port`, `pipe:cmd`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The address the sender wrote, when alias expansion replaced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<Address>,
    /// The system user a local delivery runs as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl Recipient {
    pub fn new(address: Address) -> Recipient {
        Recipient {
            address,
            orcpt: None,
            notify: Vec::new(),
            state: RcptState::Pending,
            reply: None,
            route: None,
            original: None,
            user: None,
        }
    }
}

/// How the connection to a per-message smarthost is protected (`BX-MTA-Rem-LinkConfidentiality`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum LinkSecurity {
    /// STARTTLS when offered (credentials are still only sent under TLS).
    May,
    /// `tls`: STARTTLS required.
    Tls,
    /// `ssl`: TLS from the first byte (port 465 style).
    Ssl,
}

/// A smarthost named by the message itself (`BX-MTA-Rem-*`), with its credentials. The job
/// file (mode 0640: the qms user and group only) is the only place the password is kept.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Smarthost {
    pub host: String,
    pub port: u16,
    pub security: LinkSecurity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A client certificate and its key (PEM), for servers that ask for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Smarthost {
    // By hand, so that no debug print can show the password.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}", self)
    }
}

impl std::fmt::Display for Smarthost {
    /// `[host]:port (tls, user alice)`: what logs and `qms queue show` may say of it.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let security = match self.security {
            LinkSecurity::May => "starttls if offered",
            LinkSecurity::Tls => "starttls",
            LinkSecurity::Ssl => "tls",
        };
        write!(f, "[{}]:{} ({security}", self.host, self.port)?;
        if let Some(u) = &self.user {
            write!(f, ", user {u}")?;
        }
        if self.cert_file.is_some() {
            write!(f, ", client certificate")?;
        }
        write!(f, ")")
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub version: u32,
    pub id: QueueId,
    /// The queue this job belongs to (kept while it sits in hold).
    pub queue: String,
    /// The name of this job's link to the message file, under `msg/`; empty when the
    /// message is in the job's own file (`message_at`).
    pub body: String,
    /// Where the message starts in this job's own file, after the JSON and its padding; 0
    /// when it is a file under `msg/` (`body`). One file per message: smtpd's direct route.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub message_at: u64,
    /// Size of the message in bytes.
    pub size: u64,
    pub arrival: i64,
    /// When to tell the sender the message is delayed, and how far to move it after that.
    pub warn_at: i64,
    pub warn_delta: i64,
    pub expires_at: i64,
    #[serde(with = "reverse_path")]
    pub sender: Option<Address>,
    pub client: Client,
    /// How it arrived: `smtp`, `submission`, `submissions`, `sendmail`, `bounce`.
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<DsnRet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
    /// The message's Message-ID (without angle brackets), for tracking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Tracked sending (X822-MSP): the application's reference (`X-B-CrossRef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crossref: Option<String>,
    /// What to do when a recipient is not delivered (`X-B-Non-Delivery-Notification-Actions`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nd_actions: Vec<String>,
    /// `BX-Sending-Run-Control: dryrun`: route, log and track, deliver nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dryrun: bool,
    /// `BX-Sending-Run-Control: ignore-suppression`: send even to suppressed recipients.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_suppression: bool,
    /// `[auth_checks]`: the Authentication-Results value smtpd found; the router writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_results: Option<String>,
    /// `[arc]`: the ARC set smtpd sealed the message with as it arrived (three header
    /// fields); the router adds it to the copies an alias forwards to other domains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arc_seal: Option<String>,
    /// `[auth_checks] quarantine = "hold"`: why DMARC quarantines this message; the router
    /// puts its output jobs on hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<String>,
    /// `BX-Sending-Run-Control: debug`: log the whole SMTP dialogue of this message.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub debug: bool,
    /// `BX-MTA-Rem-*`: the smarthost this message leaves through, instead of its routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smarthost: Option<Smarthost>,
    /// `BX-MTA-Submission-Post-Plugins`: allow-listed programs told of every attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_plugins: Vec<String>,
    /// SMTPUTF8 was requested; 8BITMIME body.
    #[serde(default)]
    pub smtputf8: bool,
    #[serde(default)]
    pub eightbit: bool,
    pub recipients: Vec<Recipient>,
    #[serde(default)]
    pub attempts: u32,
    pub next_attempt: i64,
    /// The delay warning was sent.
    #[serde(default)]
    pub warned: bool,
    /// A one-file job made visible before it was synced (smtpd's group commit): the
    /// checksum of its file, by which a start after a machine crash tells a torn one (see
    /// `inline::seal`). Last, so that it covers all the JSON before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<Seal>,
}

/// The CRC-32 of a one-file job's JSON up to its `crc32` field and of its message, written
/// as 8 hex digits (fixed, so that writing it moves nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seal(pub u32);

impl Serialize for Seal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:08x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Seal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Seal, D::Error> {
        let text = String::deserialize(d)?;
        match u32::from_str_radix(&text, 16) {
            Ok(v) if text.len() == 8 => Ok(Seal(v)),
            _ => Err(serde::de::Error::custom(format!(
                "crc32 {text:?} is not 8 hex digits"
            ))),
        }
    }
}

impl Job {
    /// Records a tracking event for one recipient of this job.
    pub fn track(
        &self,
        recipient: &Address,
        event: &str,
        from: &str,
        to: &str,
    ) -> qms_common::track::Event {
        qms_common::track::Event::new(
            self.id.as_str(),
            self.message_id.as_deref(),
            &recipient.to_string(),
            event,
            from,
            to,
        )
    }

    /// The unfinished recipients.
    pub fn pending(&self) -> impl Iterator<Item = &Recipient> {
        self.recipients.iter().filter(|r| !r.state.is_final())
    }

    pub fn is_done(&self) -> bool {
        self.recipients.iter().all(|r| r.state.is_final())
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Job {
    /// A new job for `queue` with the times of the config's retry policy; the spool gives it
    /// its id and message file when it is staged.
    pub fn new(
        queue: &str,
        sender: Option<Address>,
        recipients: Vec<Recipient>,
        client: Client,
        protocol: &str,
        timing: &qms_common::config::Outgoing,
    ) -> Job {
        let now = qms_common::time::now();
        Job {
            version: 1,
            id: QueueId::generate(),
            queue: queue.to_string(),
            body: String::new(),
            message_at: 0,
            size: 0,
            arrival: now,
            warn_at: now + timing.delay_warning,
            warn_delta: timing.delay_warning,
            expires_at: now + timing.max_queue_lifetime,
            sender,
            client,
            protocol: protocol.to_string(),
            ret: None,
            envid: None,
            message_id: None,
            crossref: None,
            nd_actions: Vec::new(),
            dryrun: false,
            ignore_suppression: false,
            auth_results: None,
            arc_seal: None,
            quarantine: None,
            debug: false,
            smarthost: None,
            post_plugins: Vec::new(),
            smtputf8: false,
            eightbit: false,
            recipients,
            attempts: 0,
            next_attempt: now,
            warned: false,
            crc32: None,
        }
    }
}
