//! `qms start`: the supervisor. It binds the listeners, cleans the spool's debris, then runs
//! one process per role and N per queue, restarts the ones that die (with backoff), scales
//! workers on SIGHUP and stops everything on SIGTERM. Like Postfix's master, it keeps root
//! (when started as root) so local delivery can become each recipient; the other roles drop it.

use crate::signals;
use fs2::FileExt;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use qms_common::log::quote;
use qms_common::{qlog, safeio, Config};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod reload;
mod slots;
use reload::open_tls;
use slots::{desired, Slot};

struct Child {
    pid: Option<Pid>,
    started: Instant,
    failures: u32,
    restart_at: Option<Instant>,
    /// Stopped on purpose to pick up a new config: restart at once, no backoff.
    recycle: bool,
}

fn pid_file(cfg: &Config) -> PathBuf {
    cfg.spool.join("run/qms.pid")
}

pub(crate) fn status_file(cfg: &Config) -> PathBuf {
    cfg.spool.join("run/status.json")
}

/// Why `qms start` gave up before supervising anything: its exit status (sysexits) and a
/// line for stderr.
struct Refusal(u8, String);

/// What `qms start` takes up before it supervises: the instance's lock, the spool, the
/// listeners and TLS files (opened as root when started as root).
struct Held {
    lock: std::fs::File,
    spool: qms_spool::Spool,
    listeners: Vec<(qms_incoming::Kind, std::net::TcpListener)>,
    tls_files: Vec<(std::fs::File, std::fs::File)>,
}

pub fn start(cfg: Config, daemon: bool) -> ExitCode {
    qms_common::log::init("master");
    // Safety: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let root = nix::unistd::geteuid().is_root();
    let held = match take_up(&cfg, root)
        .and_then(|held| detach(&cfg, daemon).map(|go| go.then_some(held)))
    {
        Ok(Some(held)) => held,
        // The parent of a daemon: the child goes on.
        Ok(None) => return ExitCode::SUCCESS,
        Err(Refusal(code, why)) => {
            eprintln!("qms: {why}");
            return ExitCode::from(code);
        }
    };
    let Held {
        lock,
        spool,
        listeners,
        tls_files,
    } = held;
    let _ = lock.set_len(0);
    let _ = (&lock).write_all(format!("{}\n", std::process::id()).as_bytes());
    // Root ends here: the supervisor goes on as the qms user, keeping only the right to
    // start local delivery agents that may become recipients' users.
    if let (true, Some(user)) = (root, cfg.user.as_deref()) {
        if let Err(e) = qms_common::privs::drop_keeping_setuid(user) {
            eprintln!("qms: cannot give up root: {e}");
            return ExitCode::from(71);
        }
    }
    let removed = spool.recover();
    qms_common::metrics::start(&cfg);
    qlog!(
        "event=start spool={} debris_removed={removed} uid={}",
        cfg.spool.display(),
        nix::unistd::getuid()
    );
    let has_listeners = !listeners.is_empty();
    // The listeners and the TLS files stay close-on-exec here: only smtpd gets them.
    let (fd_spec, listener_fds) = qms_incoming::smtpd::export(listeners);
    signals::install();
    let mut sup = Supervisor {
        cfg,
        fd_spec,
        listener_fds,
        tls_files,
        has_listeners,
        children: BTreeMap::new(),
    };
    sup.run();
    let _ = std::fs::remove_file(status_file(&sup.cfg));
    let _ = std::fs::remove_file(pid_file(&sup.cfg));
    drop(lock);
    qlog!("event=stop");
    ExitCode::SUCCESS
}

/// Everything `start` needs that may refuse: permissions (as root), the spool, the lock
/// that says "an instance runs here", the listeners and the TLS files.
fn take_up(cfg: &Config, root: bool) -> Result<Held, Refusal> {
    if root {
        // Owners and modes first, without following links; refuses to run without `user`.
        crate::permissions::at_start(cfg).map_err(|e| Refusal(78, e.to_string()))?;
    }
    let spool = qms_spool::Spool::open(&cfg.spool, &cfg.queue_names())
        .map_err(|e| Refusal(73, e.to_string()))?;
    // The pid file's lock says "an instance runs here"; it is held for the supervisor's life.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(pid_file(cfg))
        .map_err(|e| Refusal(73, format!("cannot open {}: {e}", pid_file(cfg).display())))?;
    if lock.try_lock_exclusive().is_err() {
        return Err(Refusal(
            75,
            format!("an instance is already running on {}", cfg.spool.display()),
        ));
    }
    let listeners = qms_incoming::smtpd::bind(cfg).map_err(|e| Refusal(71, e.to_string()))?;
    // The TLS key is usually readable by root alone: opened now, handed to smtpd.
    let tls_files = open_tls(cfg).map_err(|e| Refusal(78, e))?;
    Ok(Held {
        lock,
        spool,
        listeners,
        tls_files,
    })
}

/// With `daemon`, forks: false in the parent, which is done; true in the child, which
/// goes on detached. Without, true.
fn detach(cfg: &Config, daemon: bool) -> Result<bool, Refusal> {
    if !daemon {
        return Ok(true);
    }
    // No threads exist yet, so forking here is safe.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { .. }) => Ok(false),
        Ok(nix::unistd::ForkResult::Child) => {
            let _ = nix::unistd::setsid();
            // The terminal is gone: lines meant for stderr go to the system log, in this
            // process and in every role it starts (they inherit the variable).
            std::env::set_var(qms_common::log::DETACHED_ENV, "1");
            qms_common::log::set_target(&cfg.log_target);
            Ok(true)
        }
        Err(e) => Err(Refusal(71, format!("fork: {e}"))),
    }
}

struct Supervisor {
    cfg: Config,
    fd_spec: String,
    /// The listeners' descriptors, and below the TLS files: smtpd's alone, never another
    /// child's (a delivery command that inherited them could take port 25's connections or
    /// read the key).
    listener_fds: Vec<RawFd>,
    /// `[tls]` certificate and key files, each pair opened together (at start as root; again
    /// on SIGHUP when qms's user may read them, for renewed certificates).
    tls_files: Vec<(std::fs::File, std::fs::File)>,
    has_listeners: bool,
    children: BTreeMap<Slot, Child>,
}

impl Supervisor {
    fn run(&mut self) {
        self.reconcile();
        while !signals::stopping() {
            std::thread::sleep(Duration::from_millis(100));
            self.reap();
            if signals::RELOAD.swap(false, Ordering::SeqCst) {
                self.reload();
            }
            self.restart_due();
        }
        self.shutdown();
    }

    /// Starts what the config wants and is missing; stops what it no longer wants.
    fn reconcile(&mut self) {
        let want = desired(&self.cfg, self.has_listeners);
        let extra: Vec<Slot> = self
            .children
            .keys()
            .filter(|s| !want.contains(s))
            .cloned()
            .collect();
        for slot in extra {
            if let Some(Child { pid: Some(pid), .. }) = self.children.remove(&slot) {
                qlog!("event=scale-down process={} pid={pid}", slot.name());
                let _ = kill(pid, Signal::SIGTERM);
                // Reaped by the SIGCHLD loop; the slot is gone, so it will not come back.
            }
        }
        for slot in want {
            if !self.children.contains_key(&slot) {
                let pid = self.spawn(&slot);
                let restart_at = pid
                    .is_none()
                    .then(|| Instant::now() + Duration::from_secs(1));
                self.children.insert(
                    slot,
                    Child {
                        pid,
                        started: Instant::now(),
                        failures: 0,
                        restart_at,
                        recycle: false,
                    },
                );
            }
        }
        self.write_status();
    }

    fn reap(&mut self) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(s) => s,
            };
            let (pid, why) = match status {
                WaitStatus::Exited(pid, code) => (pid, format!("exit status {code}")),
                WaitStatus::Signaled(pid, sig, _) => (pid, format!("killed by {sig:?}")),
                _ => continue,
            };
            let stopping = signals::stopping();
            let Some((slot, child)) = self.children.iter_mut().find(|(_, c)| c.pid == Some(pid))
            else {
                continue;
            };
            child.pid = None;
            if stopping {
                continue;
            }
            if child.recycle {
                child.recycle = false;
                child.restart_at = Some(Instant::now());
                qlog!("event=recycled process={} pid={pid}", slot.name());
                continue;
            }
            // A child that ran a while gets a fresh start; one that keeps dying waits longer.
            if child.started.elapsed() > Duration::from_secs(60) {
                child.failures = 0;
            }
            child.failures += 1;
            let delay =
                Duration::from_millis(250u64 << child.failures.min(8)).min(Duration::from_secs(60));
            child.restart_at = Some(Instant::now() + delay);
            qlog!(
                "event=died process={} pid={pid} reason={} restart_in={}ms",
                slot.name(),
                quote(&why),
                delay.as_millis()
            );
        }
    }

    fn restart_due(&mut self) {
        let now = Instant::now();
        let due: Vec<Slot> = self
            .children
            .iter()
            .filter(|(_, c)| c.pid.is_none() && c.restart_at.is_some_and(|t| t <= now))
            .map(|(s, _)| s.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        for slot in due {
            let pid = self.spawn(&slot);
            if let Some(c) = self.children.get_mut(&slot) {
                c.pid = pid;
                c.started = Instant::now();
                c.restart_at = if pid.is_none() {
                    Some(now + Duration::from_secs(5))
                } else {
                    None
                };
            }
        }
        self.write_status();
    }

    fn shutdown(&mut self) {
        qlog!(
            "event=stopping children={}",
            self.children.values().filter(|c| c.pid.is_some()).count()
        );
        for c in self.children.values() {
            if let Some(pid) = c.pid {
                let _ = kill(pid, Signal::SIGTERM);
            }
        }
        let end = Instant::now() + Duration::from_secs(30);
        while self.children.values().any(|c| c.pid.is_some()) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
            self.reap();
        }
        for c in self.children.values() {
            if let Some(pid) = c.pid {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
    }

    fn write_status(&self) {
        for q in self.cfg.queue_names() {
            let running = self
                .children
                .iter()
                .filter(|(s, c)| {
                    // The incoming queue's workers are the routers.
                    let serves = s.queue.as_deref() == Some(q.as_str())
                        || (q == "incoming" && s.role == "router");
                    serves && c.pid.is_some()
                })
                .count();
            qms_common::metrics::gauge("qms_workers", &[("queue", &q)], running as f64);
        }
        let procs: Vec<serde_json::Value> = self
            .children
            .iter()
            .map(
                |(s, c)| serde_json::json!({"process": s.name(), "pid": c.pid.map(|p| p.as_raw())}),
            )
            .collect();
        let doc = serde_json::json!({"pid": std::process::id(), "processes": procs});
        let path = status_file(&self.cfg);
        let tmp = self
            .cfg
            .spool
            .join("tmp")
            .join(format!("status.{}.json", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let _ = safeio::write_atomic(tmp, path, doc.to_string().as_bytes());
    }
}

/// The supervisor's pid while it runs. The lock on the pid file is the test: it is held for
/// the supervisor's whole life, and released even if the process is not yet reaped.
pub(crate) fn running_pid(cfg: &Config) -> Option<Pid> {
    let file = std::fs::File::open(pid_file(cfg)).ok()?;
    if file.try_lock_shared().is_ok() {
        return None;
    }
    let text = std::fs::read_to_string(pid_file(cfg)).ok()?;
    Some(Pid::from_raw(text.trim().parse().ok()?))
}

pub fn stop(cfg: &Config) -> ExitCode {
    let Some(pid) = running_pid(cfg) else {
        eprintln!("qms: no instance is running on {}", cfg.spool.display());
        return ExitCode::from(1);
    };
    let _ = kill(pid, Signal::SIGTERM);
    let end = Instant::now() + Duration::from_secs(60);
    while running_pid(cfg).is_some() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    if running_pid(cfg).is_some() {
        eprintln!("qms: supervisor {pid} did not stop within 60 s");
        return ExitCode::from(1);
    }
    println!("qms: stopped");
    ExitCode::SUCCESS
}
