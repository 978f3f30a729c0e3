//! Delivery on this machine (Maildir, mbox, file, pipe), error mail (RFC 3464 DSNs), and
//! what every delivery agent does after an attempt: retry later, give up, or finish.

mod asuser;
pub mod dsn;
pub mod dsnproc;
mod filtering;
mod imap;
mod local;
mod maildir;
mod mbox;
mod pipe;
pub mod plugin;
mod program;
pub mod report;
mod runas;
pub mod settle;
pub mod sieve;

use qms_spool::{RcptState, Recipient};

/// The tracking name of a recipient's state in an output job: a pending one has been routed.
pub fn track_state(r: &Recipient) -> &'static str {
    match r.state {
        RcptState::Pending => "routed",
        s => s.as_str(),
    }
}

pub use local::LocalAgent;

use qms_spool::Claimed;

/// A delivery agent: takes a batch of claimed jobs of its queue and settles each one.
pub trait Agent {
    fn deliver(&mut self, batch: Vec<Claimed>);
}

mod loops {
    /// True when the message already carries `Delivered-To: addr`: it has been here before.
    pub fn delivered_to(msg: &[u8], addr: &str) -> bool {
        let end = msg
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(msg.len());
        msg[..end].split(|b| *b == b'\n').any(|line| {
            let line = String::from_utf8_lossy(line);
            let mut parts = line.splitn(2, ':');
            matches!((parts.next(), parts.next()), (Some(name), Some(value))
                if name.trim().eq_ignore_ascii_case("delivered-to") && value.trim().eq_ignore_ascii_case(addr))
        })
    }
}
