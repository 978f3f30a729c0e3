//! Tracked sending does not send again to a recipient on the suppression list (`qms
//! suppress`, `[tracking] suppress`): the recipient fails at once, saying why, unless the
//! message asks with `BX-Sending-Run-Control: ignore-suppression`.

use qms_common::log::quote;
use qms_common::{qlog, Address};
use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a database that could not be reached is left alone before the next try.
const RETRY: Duration = Duration::from_secs(30);

pub struct Suppression {
    cfg: Arc<qms_common::Config>,
    /// Opened at the first tracked message. While it cannot be, nothing is suppressed: the
    /// list keeps mail from being sent, a broken list must not lose it.
    db: RefCell<Option<qms_tracker::Db>>,
    failed_at: Cell<Option<Instant>>,
}

/// Why a recipient is not sent to.
pub struct Refused {
    /// The recipient's reply, for the log, the job and the error mail.
    pub reply: String,
    /// The reason on the list ("user unknown", "complaint", …).
    pub reason: String,
}

impl Suppression {
    pub fn new(cfg: Arc<qms_common::Config>) -> Suppression {
        Suppression {
            cfg,
            db: RefCell::new(None),
            failed_at: Cell::new(None),
        }
    }

    /// The refusal of `addr`, when it is suppressed.
    pub fn check(&self, addr: &Address) -> Option<Refused> {
        let mut db = self.db.borrow_mut();
        let resting = self.failed_at.get().is_some_and(|t| t.elapsed() < RETRY);
        if db.is_none() && !resting {
            match qms_tracker::Db::connect(&self.cfg) {
                Ok(d) => *db = Some(d),
                Err(e) => {
                    self.failed_at.set(Some(Instant::now()));
                    qlog!(
                        "status=warning reason={}",
                        quote(&format!("suppression list not consulted: {e}"))
                    );
                }
            }
        }
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
