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
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// One process the supervisor keeps running: `router`, `smtpd`, `deliver/smtp#2`, …
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    role: String,
    queue: Option<String>,
    index: usize,
}

impl Slot {
    fn name(&self) -> String {
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

fn desired(cfg: &Config, smtpd: bool) -> Vec<Slot> {
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

pub fn start(cfg: Config, daemon: bool) -> ExitCode {
    qms_common::log::init("master");
    // Safety: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let root = nix::unistd::geteuid().is_root();
    if root {
        // Owners and modes first, without following links; refuses to run without `user`.
        if let Err(e) = crate::permissions::at_start(&cfg) {
            eprintln!("qms: {e}");
            return ExitCode::from(78);
        }
    }
    let spool = match qms_spool::Spool::open(&cfg.spool, &cfg.queue_names()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("qms: {e}");
            return ExitCode::from(73);
        }
    };
    // The pid file's lock says "an instance runs here"; it is held for the supervisor's life.
    let lock = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(pid_file(&cfg))
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("qms: cannot open {}: {e}", pid_file(&cfg).display());
            return ExitCode::from(73);
        }
    };
    if lock.try_lock_exclusive().is_err() {
        eprintln!(
            "qms: an instance is already running on {}",
            cfg.spool.display()
        );
        return ExitCode::from(75);
    }
    let listeners = match qms_incoming::smtpd::bind(&cfg) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("qms: {e}");
            return ExitCode::from(71);
        }
    };
    // The TLS key is usually readable by root alone: opened now, handed to smtpd.
    let tls_files = match open_tls(&cfg) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("qms: {e}");
            return ExitCode::from(78);
        }
    };
    if daemon {
        // No threads exist yet, so forking here is safe.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Parent { .. }) => return ExitCode::SUCCESS,
            Ok(nix::unistd::ForkResult::Child) => {
                let _ = nix::unistd::setsid();
                // The terminal is gone: lines meant for stderr go to the system log, in this
                // process and in every role it starts (they inherit the variable).
                std::env::set_var(qms_common::log::DETACHED_ENV, "1");
                qms_common::log::set_target(&cfg.log_target);
            }
            Err(e) => {
                eprintln!("qms: fork: {e}");
                return ExitCode::from(71);
            }
        }
    }
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

/// Opens `[tls] cert` and `key`, then each `[tls.sni]` pair (checking that they make a
/// server config).
fn open_tls(cfg: &Config) -> Result<Vec<(std::fs::File, std::fs::File)>, String> {
    let Some(t) = &cfg.tls else {
        return Ok(Vec::new());
    };
    qms_incoming::tls::server_config(t)?;
    let open =
        |p: &std::path::Path| std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()));
    std::iter::once((&t.cert, &t.key))
        .chain(t.sni.values().map(|(c, k)| (c, k)))
        .map(|(c, k)| Ok((open(c)?, open(k)?)))
        .collect()
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

    fn spawn(&self, slot: &Slot) -> Option<Pid> {
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

    fn reload(&mut self) {
        match Config::load(&self.cfg.path) {
            Ok(new) => {
                qlog!("event=reload config={}", self.cfg.path.display());
                // Listeners are bound once, as root, and the supervisor is root no more: a
                // listener added or removed takes effect at the next start, and says so.
                let changed = listener_changes(&self.cfg, &new);
                if !changed.is_empty() {
                    qlog!(
                        "event=reload status=warning reason={} listeners={}",
                        quote("listen addresses change only when qms is restarted (qms stop; qms start)"),
                        quote(&changed.join(","))
                    );
                }
                self.cfg = new;
                self.reopen_tls();
                qms_common::metrics::start(&self.cfg);
                // Roles read the config when they start: the ones that stay are recycled
                // (a clean stop releases their jobs), extra ones stop, missing ones start.
                let want = desired(&self.cfg, self.has_listeners);
                for (slot, c) in self.children.iter_mut() {
                    if let (Some(pid), true) = (c.pid, want.contains(slot)) {
                        c.recycle = true;
                        let _ = kill(pid, Signal::SIGTERM);
                    }
                }
                self.reconcile();
            }
            Err(e) => qlog!("event=reload status=error reason={}", quote(&e.to_string())),
        }
    }

    /// On SIGHUP: the certificate and key files opened again, so that the smtpd about to
    /// start serves a renewed certificate. qms's user must be able to read them (a key only
    /// root reads stays as opened at start, and the log says so).
    fn reopen_tls(&mut self) {
        match open_tls(&self.cfg) {
            Ok(files) => {
                if !files.is_empty() {
                    qlog!("event=reload tls=reopened pairs={}", files.len());
                }
                self.tls_files = files;
            }
            Err(e) => qlog!(
                "event=reload status=warning reason={}",
                quote(&format!(
                    "TLS files not reopened ({e}); those opened at start stay until qms is restarted"
                ))
            ),
        }
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

/// The listen addresses `new` adds or drops against `old`, as `+ADDR (smtp)`/`-ADDR (smtp)`.
fn listener_changes(old: &Config, new: &Config) -> Vec<String> {
    let kinds = [
        ("smtp", &old.smtp.listen, &new.smtp.listen),
        ("submission", &old.submission.listen, &new.submission.listen),
        (
            "submissions",
            &old.submissions.listen,
            &new.submissions.listen,
        ),
    ];
    let mut out = Vec::new();
    for (kind, was, now) in kinds {
        out.extend(
            now.iter()
                .filter(|a| !was.contains(a))
                .map(|a| format!("+{a} ({kind})")),
        );
        out.extend(
            was.iter()
                .filter(|a| !now.contains(a))
                .map(|a| format!("-{a} ({kind})")),
        );
    }
    out
}
