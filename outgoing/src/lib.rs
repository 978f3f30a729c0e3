//! Outgoing SMTP delivery. Not built yet (see the open issue for outgoing delivery): jobs
//! routed to the `smtp` queue wait there, deferred with a reply that says why, so nothing
//! routed to a remote host is lost or bounced before the agent exists.

use qms_common::{qlog, Config};
use qms_spool::{Claimed, RcptState, Spool};
use std::sync::Arc;

pub struct SmtpAgent {
    cfg: Arc<Config>,
    spool: Spool,
}

impl SmtpAgent {
    pub fn new(cfg: Arc<Config>, spool: Spool) -> SmtpAgent {
        SmtpAgent { cfg, spool }
    }
}

impl qms_delivery::Agent for SmtpAgent {
    fn deliver(&mut self, batch: Vec<Claimed>) {
        for mut c in batch {
            for r in c.job.recipients.iter_mut().filter(|r| !r.state.is_final()) {
                r.state = RcptState::Deferred;
                r.reply = Some(
                    "4.3.2 outgoing SMTP delivery is not available in this version of qms".into(),
                );
                qlog!(
                    "qid={} to={} status=deferred (outgoing SMTP not available)",
                    c.job.id,
                    r.address
                );
            }
            qms_delivery::settle::settle(&self.cfg, &self.spool, c);
        }
    }
}
