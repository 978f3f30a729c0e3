//! The long-running process roles: each opens the spool, drops privilege where it can, and
//! loops until SIGTERM.

use crate::signals;
use qms_common::log::quote;
use qms_common::{privs, qlog, Config};
use qms_spool::{Spool, WatchOptions, Watcher};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

fn open_spool(cfg: &Config) -> Result<Spool, ExitCode> {
    Spool::open(&cfg.spool, &cfg.queue_names()).map_err(|e| {
        qlog!("status=fatal reason={}", quote(&e.to_string()));
        ExitCode::from(73)
    })
}

fn watch_options(cfg: &Config, batch: usize) -> WatchOptions {
    WatchOptions {
        scan_interval: Duration::from_secs(cfg.scheduler.scan_interval),
        busy_retry: Duration::from_secs(cfg.scheduler.busy_retry),
        batch,
        share: qms_spool::Share::from_env(),
    }
}

fn start_role(cfg: &Config, role: &str, keep: Privs) -> Result<Spool, ExitCode> {
    let spool = start_role_untracked(cfg, role, keep)?;
    if let Err(e) = qms_common::track::open(&cfg.spool, role) {
        qlog!(
            "status=warning reason={}",
            quote(&format!("cannot open the tracking file: {e}"))
        );
    }
    Ok(spool)
}

/// How much privilege a role keeps (see docs/security.md).
#[derive(Clone, Copy, PartialEq)]
enum Privs {
    /// The qms user and nothing else.
    None,
    /// The qms user with CAP_SETUID and CAP_SETGID, to fork children that become a
    /// recipient's user: the local delivery agents only.
    SwitchUser,
}

fn start_role_untracked(cfg: &Config, role: &str, keep: Privs) -> Result<Spool, ExitCode> {
    qms_common::log::init(role);
    qms_common::metrics::start(cfg);
    signals::install();
    // Nothing a role writes is for anyone but the qms user.
    // Safety: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let changed = match (keep, cfg.user.as_deref()) {
        (Privs::SwitchUser, Some(user)) => privs::drop_keeping_setuid(user),
        (Privs::None, user) => privs::drop_to(user),
        (Privs::SwitchUser, None) if nix::unistd::getuid().is_root() => {
            Err("running as root needs `user` in the config".into())
        }
        (Privs::SwitchUser, None) => Ok(()),
    };
    if let Err(e) = changed {
        qlog!("status=fatal reason={}", quote(&e));
        return Err(ExitCode::from(71));
    }
    if keep == Privs::None && privs::can_switch_user() {
        qlog!("status=fatal reason=\"still able to change user after dropping privileges\"");
        return Err(ExitCode::from(71));
    }
    open_spool(cfg)
}

pub fn smtpd(cfg: Config) -> ExitCode {
    qms_common::log::init("smtpd");
    // Large blocks (an argon2 check's 19 MiB) always come from mmap and go back at free,
    // instead of staying in the arena of the session thread that used them.
    // Safety: mallopt before any thread starts.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
    let listeners = match qms_incoming::smtpd::inherited() {
        Some(l) => l,
        None => match qms_incoming::smtpd::bind(&cfg) {
            Ok(l) => l,
            Err(e) => {
                qlog!("status=fatal reason={}", quote(&e.to_string()));
                return ExitCode::from(71);
            }
        },
    };
    // The key is usually readable by root alone: under the supervisor, it opened the files
    // as root and hands them over as descriptors.
    let tls = match cfg
        .tls
        .as_ref()
        .map(|t| {
            qms_incoming::tls::inherited(t).unwrap_or_else(|| qms_incoming::tls::server_config(t))
        })
        .transpose()
    {
        Ok(t) => t,
        Err(e) => {
            qlog!("status=fatal reason={}", quote(&e));
            return ExitCode::from(78);
        }
    };
    let spool = match start_role(&cfg, "smtpd", Privs::None) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let checks = match cfg.auth_checks.enabled {
        true => match qms_incoming::authcheck::Checker::new(&cfg) {
            Ok(c) => Some(c),
            Err(e) => {
                qlog!("status=fatal reason={}", quote(&e));
                return ExitCode::from(78);
            }
        },
        false => None,
    };
    let shared = Arc::new(qms_incoming::Shared {
        checks,
        committer: qms_spool::Committer::start(spool.clone()),
        aliases: qms_common::aliases::Cache::new(cfg.aliases.clone()),
        tls,
        throttle: Default::default(),
        cfg: Arc::new(cfg),
        spool,
    });
    qms_incoming::smtpd::run(shared, listeners, &signals::STOP);
    ExitCode::SUCCESS
}

pub fn router(cfg: Config) -> ExitCode {
    let spool = match start_role(&cfg, "router", Privs::None) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let mut watcher = match Watcher::new(spool.clone(), "incoming", watch_options(&cfg, 256)) {
        Ok(w) => w,
        Err(e) => {
            qlog!("status=fatal reason={}", quote(&e.to_string()));
            return ExitCode::from(71);
        }
    };
    let mut router = match qms_router::Router::new(Arc::new(cfg), spool) {
        Ok(r) => r,
        Err(e) => {
            qlog!("status=fatal reason={}", quote(&e));
            return ExitCode::from(78);
        }
    };
    while !signals::stopping() {
        let batch = watcher.next_batch(&signals::STOP);
        if !batch.is_empty() {
            router.dispatch(batch);
        }
    }
    ExitCode::SUCCESS
}

/// `qms metrics`: the Prometheus endpoint.
pub fn metrics(cfg: Config) -> ExitCode {
    match start_role_untracked(&cfg, "metrics", Privs::None) {
        Ok(spool) => crate::metricsd::run(&cfg, spool),
        Err(c) => c,
    }
}

/// `qms tracker`: moves tracking events from the processes' files into the database. While
/// the database cannot be reached (a shared PostgreSQL that is down), the events wait in
/// their files; the log and `qms status` say the tracker is behind, and why.
pub fn tracker(cfg: Config) -> ExitCode {
    let spool = match start_role_untracked(&cfg, "tracker", Privs::None) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let dir = spool.root().join("track");
    let mut behind = Behind::new(&cfg);
    let mut db: Option<qms_tracker::Db> = None;
    let mut pruned_at = 0;
    while !signals::stopping() {
        let Some(d) = db.as_mut() else {
            match qms_tracker::Db::connect(&cfg) {
                Ok(d) => db = Some(d),
                Err(e) => {
                    behind.say(&e);
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            continue;
        };
        // `[tracking] keep`: old events go, at most once an hour.
        if let Some(keep) = cfg.tracking.keep {
            let now = qms_common::time::now();
            if now - pruned_at >= 3600 {
                pruned_at = now;
                match d.prune(now - keep as i64) {
                    Ok(0) => {}
                    Ok(n) => qlog!("status=pruned events={n} keep={keep}"),
                    Err(e) => qlog!("status=error reason={}", quote(&e)),
                }
            }
        }
        let result = d.ingest(&dir, &cfg.tracking.suppress);
        let lag = d.oldest_ingested.map_or(0.0, |t| {
            qms_common::time::now_micros().saturating_sub(t) as f64 / 1e6
        });
        qms_common::metrics::gauge("qms_tracker_lag_seconds", &[], lag);
        match result {
            Ok(n) => {
                behind.clear();
                if n == 0 {
                    std::thread::sleep(Duration::from_millis(250));
                } else {
                    qms_common::metrics::count("qms_tracker_events_total", &[], n as f64);
                }
            }
            Err(e) => {
                behind.say(&e);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    ExitCode::SUCCESS
}

/// The tracker's trouble, said once when it starts and once when it ends, and kept in
/// `run/tracker.json` for `qms status`.
struct Behind {
    file: std::path::PathBuf,
    reason: Option<String>,
}

impl Behind {
    fn new(cfg: &Config) -> Behind {
        let file = tracker_status_file(cfg);
        let _ = std::fs::remove_file(&file);
        Behind { file, reason: None }
    }

    fn say(&mut self, reason: &str) {
        if self.reason.as_deref() == Some(reason) {
            return;
        }
        qlog!(
            "status=behind reason={}",
            quote(&format!("tracking events wait in their files: {reason}"))
        );
        let doc = serde_json::json!({ "behind_since": qms_common::time::now(), "reason": reason });
        let _ = std::fs::write(&self.file, doc.to_string());
        self.reason = Some(reason.to_string());
    }

    fn clear(&mut self) {
        if self.reason.take().is_some() {
            qlog!("status=caught-up");
            let _ = std::fs::remove_file(&self.file);
        }
    }
}

/// Where the tracker says it is behind.
pub fn tracker_status_file(cfg: &Config) -> std::path::PathBuf {
    cfg.spool.join("run/tracker.json")
}

/// `qms dsnproc`: acts on the reports that come back to the envelope mailbox.
pub fn dsnproc(cfg: Config) -> ExitCode {
    let spool = match start_role(&cfg, "dsnproc", Privs::None) {
        Ok(s) => s,
        Err(c) => return c,
    };
    finished(qms_delivery::dsnproc::run(&cfg, &spool, &signals::STOP), 78)
}

/// `qms tlsrpt`: sends each finished day's TLS reports.
pub fn tlsrpt(cfg: Config) -> ExitCode {
    let spool = match start_role_untracked(&cfg, "tlsrpt", Privs::None) {
        Ok(s) => s,
        Err(c) => return c,
    };
    crate::tlsreport::role(&cfg, &spool)
}

/// The exit of a role whose loop ended: 0 when asked to stop, else `code` and the reason.
fn finished(r: Result<(), String>, code: u8) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            qlog!("status=fatal reason={}", quote(&e));
            ExitCode::from(code)
        }
    }
}

pub fn deliver(cfg: Config, queue: &str) -> ExitCode {
    if !cfg.queues.contains_key(queue) {
        eprintln!(
            "qms: no queue {queue:?} in {} (queues: {})",
            cfg.path.display(),
            cfg.queue_names().join(", ")
        );
        return ExitCode::from(64);
    }
    // Local delivery keeps the right to become each recipient's user; SMTP delivery does not.
    let smtp = cfg.agent_of(queue) == qms_common::config::Agent::Smtp;
    let keep = if smtp { Privs::None } else { Privs::SwitchUser };
    let spool = match start_role(&cfg, &format!("deliver/{queue}"), keep) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let batch = if smtp { 32 } else { 128 };
    let mut watcher = match Watcher::new(spool.clone(), queue, watch_options(&cfg, batch)) {
        Ok(w) => w,
        Err(e) => {
            qlog!("status=fatal reason={}", quote(&e.to_string()));
            return ExitCode::from(71);
        }
    };
    let cfg = Arc::new(cfg);
    let mut agent: Box<dyn qms_delivery::Agent> = match smtp {
        true => Box::new(qms_outgoing::SmtpAgent::new(
            cfg.clone(),
            spool.clone(),
            queue,
        )),
        false => Box::new(qms_delivery::LocalAgent::new(cfg.clone(), spool.clone())),
    };
    while !signals::stopping() {
        let batch = watcher.next_batch(&signals::STOP);
        if !batch.is_empty() {
            agent.deliver(batch);
        }
    }
    ExitCode::SUCCESS
}

/// `qms pickup`: takes local users' messages from the drop directory into the queue.
pub fn pickup(cfg: Config) -> ExitCode {
    let spool = match start_role(&cfg, "pickup", Privs::None) {
        Ok(s) => s,
        Err(c) => return c,
    };
    finished(qms_incoming::pickup::run(&cfg, &spool, &signals::STOP), 71)
}

/// `qms showq`: the queue listing for `mailq` run by users who cannot read the spool.
pub fn showq(cfg: Config) -> ExitCode {
    let spool = match start_role_untracked(&cfg, "showq", Privs::None) {
        Ok(s) => s,
        Err(c) => return c,
    };
    finished(crate::showq::serve(&cfg, &spool, &signals::STOP), 71)
}
