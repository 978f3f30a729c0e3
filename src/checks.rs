//! `qms check-config`: the config read as a whole, then every mistake that would otherwise
//! show only when mail meets it (a user that does not exist, a missing file or program).

use qms_common::config::Route;
use qms_common::privs::Account;
use qms_common::Config;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;

/// The problems found, one sentence each.
pub fn problems(cfg: &Config) -> Vec<String> {
    let mut p = Vec::new();
    let user = |p: &mut Vec<String>, what: &str, name: &str| {
        if Account::lookup(name).is_err() {
            p.push(format!("{what}: user {name:?} does not exist"));
        }
    };
    match &cfg.user {
        Some(u) => user(&mut p, "user", u),
        None => p.push("user is not set: `qms start` as root refuses to run without it".into()),
    }
    user(&mut p, "local.default_privs", &cfg.local.default_privs);
    for (addr, m) in &cfg.mailboxes {
        if let Some(u) = &m.user {
            user(&mut p, &format!("mailboxes.{addr:?}.user"), u);
        }
    }
    if let Some(f) = &cfg.auth.users {
        if let Err(e) = std::fs::metadata(f) {
            p.push(format!("auth.users: {}: {e}", f.display()));
        }
    }
    for (host, a) in &cfg.relay_auth {
        if let Err(e) = std::fs::metadata(&a.password_file) {
            p.push(format!(
                "relay_auth.{host:?}.password_file: {}: {e}",
                a.password_file.display()
            ));
        }
    }
    for (domain, selectors) in &cfg.dkim {
        for s in selectors {
            if let Err(e) = qms_router::dkim::read_key(&s.key) {
                p.push(format!("dkim.{domain:?} selector {}: {e}", s.selector));
            }
        }
    }
    for (q, n) in &cfg.queues {
        if *n == 0 {
            p.push(format!(
                "queues.{q}.workers is 0: mail for that queue waits forever"
            ));
        }
    }
    for d in &cfg.local_domains {
        if cfg.is_relay_domain(d) {
            p.push(format!("domain {d} is both local and relay"));
        }
    }
    for (key, r) in &cfg.routes {
        if let Route::Pipe(cmd) = r {
            if let Err(e) = program(cmd) {
                p.push(format!("routes.{key:?}: {e}"));
            }
        }
    }
    let helper = qms_incoming::sendmail::postdrop_path(cfg);
    if !helper.is_file() {
        p.push(format!(
            "{} is missing: local users cannot submit mail",
            helper.display()
        ));
    }
    if let Some(tls) = &cfg.tls {
        if let Err(e) = qms_incoming::tls::server_config(tls) {
            p.push(format!("tls: {e}"));
        }
    }
    if let Some(a) = &cfg.aliases {
        if let Err(e) = qms_common::aliases::Aliases::load(a) {
            p.push(format!("aliases: {e}"));
        }
    }
    p
}

/// What is worth saying but does not stop qms from running.
pub fn warnings(cfg: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if let Ok(privs) = Account::lookup(&cfg.local.default_privs) {
        if qms_common::privs::is_mail_system_user(cfg, privs.uid) {
            w.push(format!(
                "local.default_privs {:?} is the mail system's user: the aliases' commands and files would run with the whole queue open to them (Postfix refuses this); name an account of no privilege, such as nobody",
                cfg.local.default_privs
            ));
        }
    }
    if let Some(a) = &cfg.aliases {
        if let Ok(aliases) = qms_common::aliases::Aliases::load(a) {
            w.extend(
                aliases
                    .warnings
                    .iter()
                    .map(|x| format!("aliases: {}: {x}", a.display())),
            );
        }
    }
    w
}

/// The first word of a command must be an executable file (absolute, or in /usr/bin:/bin).
fn program(cmd: &str) -> Result<(), String> {
    let word = cmd.split_whitespace().next().unwrap_or("");
    let candidates: Vec<std::path::PathBuf> = if word.contains('/') {
        vec![word.into()]
    } else {
        ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(word))
            .collect()
    };
    let runnable = candidates.iter().any(|c| {
        std::fs::metadata(c).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    });
    if runnable {
        Ok(())
    } else {
        Err(format!("program {word:?} is not an executable file"))
    }
}

pub fn run(cfg: &Config) -> ExitCode {
    for w in warnings(cfg) {
        eprintln!("qms: {}: warning: {w}", cfg.path.display());
    }
    let found = problems(cfg);
    if found.is_empty() {
        println!("{}: ok", cfg.path.display());
        return ExitCode::SUCCESS;
    }
    for f in &found {
        eprintln!("qms: {}: {f}", cfg.path.display());
    }
    ExitCode::from(78)
}
