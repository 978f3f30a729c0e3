//! Tracked sending does not send again to a recipient on the suppression list (`qms
//! suppress`, `[tracking] suppress`): the recipient fails at once, saying why, unless the
//! message asks with `BX-Sending-Run-Control: ignore-suppression`.

use qms_common::log::quote;
use qms_common::{qlog, Address};
use std::cell::OnceCell;
use std::path::PathBuf;

pub struct Suppression {
    path: PathBuf,
    /// Opened at the first tracked message; None when it cannot be (then nothing is
    /// suppressed: the list keeps mail from being sent, a broken list must not lose it).
    db: OnceCell<Option<qms_tracker::Db>>,
}

/// Why a recipient is not sent to.
pub struct Refused {
    /// The recipient's reply, for the log, the job and the error mail.
    pub reply: String,
    /// The reason on the list ("user unknown", "complaint", …).
    pub reason: String,
}

impl Suppression {
    pub fn new(spool: &std::path::Path) -> Suppression {
        Suppression {
            path: qms_tracker::db_path(spool),
            db: OnceCell::new(),
        }
    }

    /// The refusal of `addr`, when it is suppressed.
    pub fn check(&self, addr: &Address) -> Option<Refused> {
        let db = self
            .db
            .get_or_init(|| match qms_tracker::Db::open(&self.path) {
                Ok(d) => Some(d),
                Err(e) => {
                    qlog!(
                        "status=warning reason={}",
                        quote(&format!("suppression list not consulted: {e}"))
                    );
                    None
                }
            });
        let entry = match db.as_ref()?.suppressed(&addr.to_string()) {
            Ok(e) => e?,
            Err(e) => {
                qlog!("status=warning reason={}", quote(&e));
                return None;
            }
        };
        let since = qms_common::time::iso8601(entry.time);
        let after = entry
            .qid
            .map(|q| format!(" after message {q}"))
            .unwrap_or_default();
        Some(Refused {
            reply: format!(
                "5.7.1 not sent: <{addr}> is on the suppression list since {since}{after} ({}); \
                 the sender may override with BX-Sending-Run-Control: ignore-suppression",
                entry.reason
            ),
            reason: entry.reason,
        })
    }
}
