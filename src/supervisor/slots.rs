//! The processes the supervisor keeps running ([`Slot`]: a role, or worker N of a queue),
//! which ones the config wants, and how one is started: its arguments, its environment, the
//! descriptors only smtpd inherits, and the capabilities only local delivery keeps.

use super::Supervisor;
use nix::unistd::Pid;
use qms_common::log::quote;
use qms_common::{qlog, Config};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// One process the supervisor keeps running: `router`, `smtpd`, `deliver/smtp#2`, …
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Slot {
    pub(super) role: String,
    pub(super) queue: Option<String>,
    pub(super) index: usize,
}

impl Slot {
    pub(super) fn name(&self) -> String {
        match &self.queue {
            Some(q) => format!("deliver/{q}#{}", self.index),
            None if self.index > 0 => format!("{}#{}", self.role, self.index),
            None => self.role.clone(),
        }
    }

    fn args(&self) -> Vec<String> {
        match &self.queue {
            Some(q) => vec!["deliver".into(), "--queue".into(), q.clone()],
            None => vec![self.role.clone()],
        }
    }
}

pub(super) fn desired(cfg: &Config, smtpd: bool) -> Vec<Slot> {
    let mut v = Vec::new();
    if smtpd {
        v.push(Slot {
            role: "smtpd".into(),
            queue: None,
            index: 0,
        });
    }
    for role in ["tracker", "pickup", "showq"] {
        v.push(Slot {
            role: role.into(),
            queue: None,
            index: 0,
        });
    }
    if cfg.metrics_listen.is_some() {
        v.push(Slot {
            role: "metrics".into(),
            queue: None,
            index: 0,
        });
    }
    if cfg.client.tls_reports {
        v.push(Slot {
            role: "tlsrpt".into(),
            queue: None,
            index: 0,
        });
    }
    if cfg.tracking.envelope_maildir.is_some() {
        v.push(Slot {
            role: "dsnproc".into(),
            queue: None,
            index: 0,
        });
    }
    for i in 0..cfg.queues.get("incoming").copied().unwrap_or(1).max(1) {
        v.push(Slot {
            role: "router".into(),
            queue: None,
            index: i,
        });
    }
    for (q, n) in &cfg.queues {
        if q != "incoming" {
            for i in 0..*n {
                v.push(Slot {
                    role: "deliver".into(),
                    queue: Some(q.clone()),
                    index: i,
                });
            }
        }
    }
    v
}

/// In a forked child about to exec smtpd: lets it inherit `fds` (Rust opens everything
/// close-on-exec, and every other child must keep it that way).
fn inherit(fds: &[RawFd]) -> std::io::Result<()> {
    for &fd in fds {
        // Safety: fcntl(F_SETFD) on descriptors the supervisor owns for its whole life;
        // async-signal-safe, as code between fork and exec must be.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Supervisor {
    pub(super) fn spawn(&self, slot: &Slot) -> Option<Pid> {
        let exe = std::env::current_exe().ok()?;
        let mut cmd = Command::new(exe);
        cmd.arg("-c").arg(&self.cfg.path).args(slot.args());
        cmd.env_remove(qms_incoming::smtpd::LISTEN_FDS_ENV)
            .env_remove(qms_incoming::tls::TLS_FDS_ENV)
            .env_remove(qms_spool::SHARE_ENV);
        // Workers of one queue share its new jobs (`qms_spool::Share`).
        let serves = match (slot.role.as_str(), slot.queue.as_deref()) {
            ("router", _) => Some("incoming"),
            (_, Some(q)) => Some(q),
            _ => None,
        };
        if let Some(workers) = serves.and_then(|q| self.cfg.queues.get(q)) {
            if *workers > 1 {
                cmd.env(qms_spool::SHARE_ENV, format!("{}/{workers}", slot.index));
            }
        }
        let mut fds = Vec::new();
        if slot.role == "smtpd" {
            cmd.env(qms_incoming::smtpd::LISTEN_FDS_ENV, &self.fd_spec);
            fds.extend(&self.listener_fds);
            // `CERTFD,KEYFD;CERTFD,KEYFD…`, as `qms_incoming::tls::inherited` reads it.
            let pairs: Vec<String> = self
                .tls_files
                .iter()
                .map(|(c, k)| {
                    fds.extend([c.as_raw_fd(), k.as_raw_fd()]);
                    format!("{},{}", c.as_raw_fd(), k.as_raw_fd())
                })
                .collect();
            if !pairs.is_empty() {
                cmd.env(qms_incoming::tls::TLS_FDS_ENV, pairs.join(";"));
            }
        }
        // Only local delivery agents keep the right to change user across exec; every
        // other role starts with no capability at all.
        let pass = slot
            .queue
            .as_deref()
            .is_some_and(|q| self.cfg.agent_of(q) != qms_common::config::Agent::Smtp);
        // Safety: the closure makes only fcntl and capability system calls, which are
        // async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                inherit(&fds)?;
                qms_common::privs::pass_setuid_on_exec(pass)
            });
        }
        match cmd.spawn() {
            Ok(child) => {
                let pid = Pid::from_raw(child.id() as i32);
                qlog!("event=spawn process={} pid={pid}", slot.name());
                Some(pid)
            }
            Err(e) => {
                qlog!(
                    "event=spawn-failed process={} reason={}",
                    slot.name(),
                    quote(&e.to_string())
                );
                None
            }
        }
    }
}
