//! The TOML shape of the config file, as serde reads it; `super` checks it and turns it
//! into `Config`.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(super) fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) listen: Option<OneOrMany>,
    pub(super) mynetworks: Option<Vec<String>>,
}

/// `[submission]` and `[submissions]`: no mynetworks, they relay for authenticated users only.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSubmission {
    pub(super) listen: Option<OneOrMany>,
}

impl From<RawSubmission> for RawListener {
    fn from(s: RawSubmission) -> RawListener {
        RawListener {
            listen: s.listen,
            mynetworks: None,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDomains {
    #[serde(default)]
    pub(super) local: Vec<String>,
    #[serde(default)]
    pub(super) relay: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMailbox {
    pub(super) maildir: Option<String>,
    pub(super) mbox: Option<String>,
    pub(super) user: Option<String>,
    pub(super) sieve: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    pub(super) workers: usize,
    pub(super) destination_concurrency: Option<usize>,
    pub(super) recipient_limit: Option<usize>,
    pub(super) min_backoff: Option<Secs>,
    pub(super) max_backoff: Option<Secs>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) message_size: Option<u64>,
    pub(super) recipients: Option<usize>,
    pub(super) command_line: Option<usize>,
    pub(super) text_line: Option<usize>,
    pub(super) connections: Option<usize>,
    pub(super) connections_per_client: Option<usize>,
    pub(super) command_timeout: Option<Secs>,
    pub(super) data_timeout: Option<Secs>,
    pub(super) errors: Option<u32>,
    pub(super) hops: Option<usize>,
    pub(super) pipe_timeout: Option<Secs>,
    pub(super) spool_min_free: Option<u64>,
    pub(super) connections_per_network: Option<usize>,
    pub(super) session_lifetime: Option<Secs>,
    pub(super) spool_min_free_inodes: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutgoing {
    pub(super) min_backoff: Option<Secs>,
    pub(super) max_backoff: Option<Secs>,
    pub(super) delay_warning: Option<Secs>,
    pub(super) max_queue_lifetime: Option<Secs>,
    pub(super) port: Option<u16>,
    pub(super) tls: Option<String>,
    #[serde(default)]
    pub(super) tls_routes: BTreeMap<String, RawTlsRoute>,
    pub(super) ca_file: Option<String>,
    pub(super) recipient_limit: Option<usize>,
    pub(super) destination_concurrency: Option<usize>,
    pub(super) connect_timeout: Option<Secs>,
    pub(super) command_timeout: Option<Secs>,
    pub(super) data_timeout: Option<Secs>,
    pub(super) connection_reuse: Option<Secs>,
    pub(super) mta_sts: Option<bool>,
    pub(super) mta_sts_port: Option<u16>,
    pub(super) tls_reports: Option<bool>,
}

/// A `tls_routes` entry: a level (`"verify"`), or a table with a CA file and the names the
/// certificate must carry.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawTlsRoute {
    Level(String),
    Rule(RawTlsRule),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTlsRule {
    pub(super) level: String,
    pub(super) ca_file: Option<String>,
    #[serde(rename = "match", default)]
    pub(super) names: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    pub(super) server: Option<String>,
}

/// `[srs]`: the Sender Rewriting Scheme for mail aliases forward to other domains.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSrs {
    pub(super) domain: String,
    pub(super) secret_file: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawScheduler {
    pub(super) scan_interval: Option<Secs>,
    pub(super) busy_retry: Option<Secs>,
    pub(super) direct_routing: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: String,
    pub(super) key: String,
    /// `[tls.sni."mail.other.example"] cert, key`: another certificate, for clients that ask
    /// for that name.
    #[serde(default)]
    pub(super) sni: BTreeMap<String, RawCertKey>,
    pub(super) client_ca: Option<String>,
    #[serde(default)]
    pub(super) relay_clients: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertKey {
    pub(super) cert: String,
    pub(super) key: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) users: Option<String>,
    pub(super) dovecot: Option<String>,
    pub(super) plaintext_loopback: Option<bool>,
    pub(super) max_failures: Option<u32>,
    #[serde(default)]
    pub(super) senders: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTracking {
    pub(super) envelope_maildir: Option<String>,
    pub(super) co_recipient_notices: Option<bool>,
    pub(super) envelope: Option<String>,
    pub(super) key: Option<String>,
    pub(super) key_file: Option<String>,
    pub(super) imap: Option<RawImap>,
    pub(super) suppress: Option<Vec<String>>,
    pub(super) keep: Option<Secs>,
    pub(super) database: Option<String>,
    pub(super) password_file: Option<String>,
    pub(super) database_ca_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawImap {
    pub(super) server: String,
    pub(super) user: String,
    pub(super) password_file: String,
    pub(super) mailbox: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) interval: Option<Secs>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMsp {
    #[serde(default)]
    pub(super) smarthost_users: Vec<String>,
    pub(super) plugin_dir: Option<String>,
    pub(super) plugin_timeout: Option<Secs>,
    #[serde(default)]
    pub(super) ca_files: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<String>,
    pub(super) target: Option<String>,
    pub(super) syslog_name: Option<String>,
}

/// `[dkim."example.com"]`: one selector and its key, or a list of them during a rollover.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDkim {
    pub(super) selector: String,
    pub(super) key: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawDkimEntry {
    One(RawDkim),
    Many(Vec<RawDkim>),
}

/// `[auth_checks]`: SPF, DKIM and DMARC on mail that arrives over SMTP.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuthChecks {
    pub(super) enabled: Option<bool>,
    pub(super) dmarc_reject: Option<String>,
    pub(super) spf_reject: Option<bool>,
    pub(super) quarantine: Option<String>,
}

/// `[relay_auth."HOST"]`: the login qms gives a relay host of the routing table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRelayAuth {
    pub(super) user: String,
    pub(super) password_file: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Raw {
    pub(super) spool: String,
    pub(super) hostname: Option<String>,
    pub(super) node: Option<String>,
    pub(super) user: Option<String>,
    pub(super) postmaster: Option<String>,
    pub(super) trusted_users: Option<Vec<String>>,
    pub(super) aliases: Option<String>,
    pub(super) recipient_delimiter: Option<String>,
    #[serde(default)]
    pub(super) smtp: RawListener,
    #[serde(default)]
    pub(super) submission: RawSubmission,
    #[serde(default)]
    pub(super) submissions: RawSubmission,
    #[serde(default)]
    pub(super) domains: RawDomains,
    #[serde(default)]
    pub(super) routes: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) mailboxes: BTreeMap<String, RawMailbox>,
    #[serde(default)]
    pub(super) queues: BTreeMap<String, RawQueue>,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) outgoing: RawOutgoing,
    #[serde(default)]
    pub(super) scheduler: RawScheduler,
    #[serde(default)]
    pub(super) dns: RawDns,
    pub(super) tls: Option<RawTls>,
    #[serde(default)]
    pub(super) auth: RawAuth,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) tracking: RawTracking,
    #[serde(default)]
    pub(super) msp: RawMsp,
    #[serde(default)]
    pub(super) local: super::local::RawLocal,
    #[serde(default)]
    pub(super) sieve: super::sieve::RawSieve,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
    #[serde(default)]
    pub(super) dkim: BTreeMap<String, RawDkimEntry>,
    pub(super) srs: Option<RawSrs>,
    pub(super) arc: Option<super::arc::RawArc>,
    #[serde(default)]
    pub(super) relay_auth: BTreeMap<String, RawRelayAuth>,
    #[serde(default)]
    pub(super) auth_checks: RawAuthChecks,
}

/// A duration in seconds, written as a number (`300`) or with a unit: `90s`, `5m`, `4h`,
/// `5d`, `2w` (`qms.toml(5)`). Never negative.
#[derive(Clone, Copy, Debug)]
pub(super) struct Secs(pub(super) u64);

impl Secs {
    pub(super) fn get(self) -> u64 {
        self.0
    }

    pub(super) fn signed(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }
}

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secs, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Secs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a duration: seconds (300) or a number with s, m, h, d or w (5m, 4h, 5d)",
                )
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Secs, E> {
                u64::try_from(v)
                    .map(Secs)
                    .map_err(|_| E::custom(format!("{v} is negative: a duration is 0 or more")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Secs, E> {
                Ok(Secs(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secs, E> {
                crate::time::parse_duration(v).map(Secs).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}
