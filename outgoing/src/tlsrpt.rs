//! TLS reporting (RFC 8460), the counting half: each connection made under a policy (DANE or
//! MTA-STS), and each policy that could not be had, is one line in `tls/reports/DAY` of the
//! spool (UTC day, JSON lines, appended). `qms tls-report` turns a day into the reports
//! the policy domains ask for.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The policy a session was made under, as the report names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Applied {
    /// `sts`, `tlsa` or `no-policy-found`.
    pub kind: String,
    pub domain: String,
    /// The policy: MTA-STS's lines, or the TLSA records in presentation form.
    pub strings: Vec<String>,
    /// MTA-STS: the policy's `mx` patterns.
    pub mx: Vec<String>,
}

/// One session, or one failure before any session.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Line {
    pub time: i64,
    #[serde(flatten)]
    pub policy: Applied,
    /// `success`, or an RFC 8460 result type (`validation-failure`, …).
    pub result: String,
    #[serde(default)]
    pub mx_host: String,
    #[serde(default)]
    pub ip: String,
    #[serde(default)]
    pub detail: String,
}

/// Where a spool's counts go.
pub struct Recorder {
    dir: PathBuf,
    enabled: bool,
}

impl Recorder {
    pub fn new(spool: &Path, enabled: bool) -> Recorder {
        Recorder {
            dir: spool.join("tls/reports"),
            enabled,
        }
    }

    /// The file of one UTC day.
    pub fn day_file(spool: &Path, day: &str) -> PathBuf {
        spool.join("tls/reports").join(day)
    }

    /// Appends one line; a report is best effort, so a failure is logged, never fatal.
    pub fn record(&self, line: Line) {
        if !self.enabled || line.policy.kind.is_empty() {
            return;
        }
        let day = qms_common::time::day(line.time);
        let Ok(mut json) = serde_json::to_vec(&line) else {
            return;
        };
        json.push(b'\n');
        let written = std::fs::create_dir_all(&self.dir).and_then(|_| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(self.dir.join(day))?
                // One write of one line: lines of several processes never interleave.
                .write_all(&json)
        });
        if let Err(e) = written {
            qms_common::qlog!(
                "status=warning reason={}",
                qms_common::log::quote(&format!("TLS report line not written: {e}"))
            );
        }
    }
}

/// The RFC 8460 result type for a failed handshake or check.
pub(crate) fn result_type(reason: &str, dane: bool) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("starttls") {
        "starttls-not-supported"
    } else if dane {
        "validation-failure"
    } else if r.contains("notvalidforname") || r.contains("not valid for name") {
        "certificate-host-mismatch"
    } else if r.contains("expired") {
        "certificate-expired"
    } else if r.contains("unknownissuer") || r.contains("unknown issuer") {
        "certificate-not-trusted"
    } else {
        "validation-failure"
    }
}
