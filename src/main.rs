//! `qms`: one binary, a subcommand per process role and per tool. Called through a link named
//! `sendmail`, `mailq` or `newaliases`, it behaves as that command.

mod checks;
mod dkim;
mod metricsd;
mod permissions;
mod queuetool;
mod requeue;
mod roles;
mod showq;
mod sieve;
mod signals;
mod status;
mod supervisor;
mod suppress;
mod tlsreport;
mod track;

use clap::{Parser, Subcommand};
use qms_common::Config;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "qms",
    version,
    about = "A queue-based, multi-process mail transfer agent"
)]
struct Cli {
    /// The config file (else $QMS_CONFIG, else /etc/qms/qms.toml).
    #[arg(short = 'c', long = "config", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole MTA: one process per role, N workers per queue, restarted when they die.
    Start {
        /// Detach from the terminal after start-up.
        #[arg(long)]
        daemon: bool,
    },
    /// Stop a running instance (SIGTERM to its supervisor).
    Stop,
    /// Show the processes of a running instance and the depth of every queue.
    Status,
    /// Role: the SMTP, submission and submissions listeners.
    Smtpd,
    /// Role: route incoming jobs to the output queues.
    Router,
    /// Role: deliver the jobs of one output queue.
    Deliver {
        #[arg(long)]
        queue: String,
    },
    /// Role: move tracking events into the tracking database.
    Tracker,
    /// Role: take local users' messages from the drop directory into the queue.
    Pickup,
    /// Role: the queue listing for `mailq` run by users who cannot read the spool.
    Showq,
    /// Role: the Prometheus endpoint of `[metrics] listen`.
    Metrics,
    /// As root: create the spool and fix its owners and modes, and those of qms-postdrop,
    /// as docs/security.md lists them. Never follows a symbolic link.
    SetPermissions,
    /// Role: act on the reports that come back to `[tracking] envelope_maildir`.
    Dsnproc,
    /// Show the history of each recipient of a message (queue id or Message-ID), or of all.
    Track(track::TrackArgs),
    /// Delivery reports: `qms dsn classify FILE…` prints one JSON object per file.
    #[command(subcommand)]
    Dsn(DsnCmd),
    /// DKIM keys: `qms dkim keygen DOMAIN SELECTOR --out FILE [--ed25519]`, `qms dkim check DOMAIN`.
    #[command(subcommand)]
    Dkim(dkim::DkimCmd),
    /// TLS reports (RFC 8460): print one day's, or `--send` them to the domains that ask.
    TlsReport(tlsreport::TlsReportArgs),
    /// Role: send each day's TLS reports after the day ends.
    Tlsrpt,
    /// Sieve filters: `qms sieve check FILE`, `qms sieve test FILE MESSAGE [--from --to]`.
    #[command(subcommand)]
    Sieve(sieve::SieveCmd),
    /// Look into the queue and act on it.
    #[command(subcommand)]
    Queue(queuetool::QueueCmd),
    /// The suppression list: recipients tracked sending no longer sends to.
    #[command(subcommand)]
    Suppress(suppress::SuppressCmd),
    /// Check the config file and say where it is wrong.
    CheckConfig,
    /// Print the configuration in force, every key with its value (like postconf).
    Config {
        /// Only what differs from the defaults (like postconf -n).
        #[arg(short = 'n')]
        non_default: bool,
    },
    /// Check the aliases file (lookups read it directly; changes apply without a restart).
    Newaliases,
    /// Print a `user:hash` line for the `[auth] users` file; the password is read from stdin.
    Passwd { user: String },
    /// sendmail(8)-compatible local injection.
    Sendmail {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DsnCmd {
    /// Classify messages: dsn, mdn, bounce, autoreply or other, with per-recipient results.
    Classify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn load_config(explicit: Option<&Path>) -> Result<Config, ExitCode> {
    let path = qms_common::config::locate(explicit);
    Config::load(&path).map_err(|e| {
        eprintln!("qms: {e}");
        ExitCode::from(78)
    })
}

fn main() -> ExitCode {
    // qms is never installed set-id; if it was, that privilege is given up here, for good,
    // before anything is read.
    if let Err(e) = qms_common::privs::drop_setid() {
        eprintln!("qms: {e}");
        return ExitCode::from(71);
    }
    // Tools end quietly when their output pipe closes (`qms queue list | head`); the
    // long-running roles ignore SIGPIPE again in `signals::install`.
    // Safety: setting a signal disposition to its default before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let argv: Vec<String> = std::env::args().collect();
    let prog = argv
        .first()
        .map(|a| {
            Path::new(a)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    if let Some(code) = by_name(&prog, &argv) {
        return code;
    }
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Sendmail { args } => return sendmail(cli.config.as_deref(), args),
        Cmd::Passwd { user } => return passwd(user),
        Cmd::Dsn(DsnCmd::Classify { files }) => return classify(files),
        _ => {}
    }
    if let Cmd::Sieve(s) = cli.cmd {
        // A user trying a script may have no config to read: its limits then are the defaults.
        let path = qms_common::config::locate(cli.config.as_deref());
        let cfg = Config::load(&path).ok();
        return sieve::run(cfg.as_ref(), s);
    }
    let cfg = match load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    qms_common::log::set_format(cfg.log_format, &cfg.log_syslog_name, &cfg.hostname);
    qms_common::log::set_target(&cfg.log_target);
    if let (true, Some(user)) = (nix::unistd::getuid().is_root(), cfg.user.as_deref()) {
        if let Ok(a) = qms_common::privs::Account::lookup(user) {
            qms_common::log::give_file_to(a.uid.as_raw(), a.gid.as_raw());
        }
    }
    let code = run(cli.cmd, cfg);
    // Nothing of a message finished here (a role stopping, `qms queue delete`) stays in
    // the spool's reuse pool.
    qms_spool::empty_pending();
    code
}

/// The sendmail-compatible names qms answers to (`sendmail`, `mailq`, `newaliases`, links
/// to it): their command, or None for `qms` itself.
fn by_name(prog: &str, argv: &[String]) -> Option<ExitCode> {
    let code = match prog {
        "sendmail" => sendmail(None, &argv[1..]),
        "mailq" => match load_config(None) {
            Ok(c) => queuetool::run(&c, queuetool::QueueCmd::list_all()),
            Err(code) => code,
        },
        "newaliases" => match load_config(None) {
            Ok(c) => newaliases(&c),
            Err(code) => code,
        },
        _ => return None,
    };
    Some(code)
}

/// Runs a command that needs the configuration.
fn run(cmd: Cmd, cfg: Config) -> ExitCode {
    match cmd {
        Cmd::Start { daemon } => supervisor::start(cfg, daemon),
        Cmd::Stop => supervisor::stop(&cfg),
        Cmd::Status => status::run(&cfg),
        Cmd::Smtpd => roles::smtpd(cfg),
        Cmd::Router => roles::router(cfg),
        Cmd::Tracker => roles::tracker(cfg),
        Cmd::Pickup => roles::pickup(cfg),
        Cmd::Showq => roles::showq(cfg),
        Cmd::Metrics => roles::metrics(cfg),
        Cmd::SetPermissions => permissions::run(&cfg),
        Cmd::Dsnproc => roles::dsnproc(cfg),
        Cmd::TlsReport(a) => tlsreport::run(&cfg, a),
        Cmd::Tlsrpt => roles::tlsrpt(cfg),
        Cmd::Track(a) => track::run(&cfg, a),
        Cmd::Deliver { queue } => roles::deliver(cfg, &queue),
        Cmd::Queue(q) => queuetool::run(&cfg, q),
        Cmd::Dkim(d) => dkim::run(&cfg, d),
        Cmd::Suppress(s) => suppress::run(&cfg, s),
        Cmd::CheckConfig => checks::run(&cfg),
        Cmd::Config { non_default } => show_config(&cfg, non_default),
        Cmd::Newaliases => newaliases(&cfg),
        Cmd::Passwd { .. } | Cmd::Sendmail { .. } | Cmd::Dsn(_) | Cmd::Sieve(_) => {
            ExitCode::SUCCESS
        }
    }
}

/// `qms config [-n]`: TOML that `check-config` reads back into the same configuration.
fn show_config(cfg: &Config, non_default: bool) -> ExitCode {
    use qms_common::config::Effective;
    let shown = if non_default {
        match Effective::non_default(cfg) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("qms: {e}");
                return ExitCode::from(70);
            }
        }
    } else {
        Effective::of(cfg)
    };
    print!("# {}\n{}", cfg.path.display(), shown.render());
    ExitCode::SUCCESS
}

fn classify(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for f in files {
        let result = std::fs::read(f)
            .map_err(|e| e.to_string())
            .and_then(|raw| qms_delivery::report::classify(&raw));
        match result {
            Ok(r) => {
                let mut v = r.to_json();
                v["file"] = serde_json::Value::String(f.display().to_string());
                println!("{v}");
            }
            Err(e) => {
                eprintln!("qms: {}: {e}", f.display());
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(65)
    } else {
        ExitCode::SUCCESS
    }
}

fn passwd(user: &str) -> ExitCode {
    if user.is_empty() || user.contains([':', '\n']) {
        eprintln!("qms: a user name has no ':' or newline");
        return ExitCode::from(64);
    }
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err()
        || line.trim_end_matches(['\r', '\n']).is_empty()
    {
        eprintln!("qms: give the password on standard input");
        return ExitCode::from(66);
    }
    match qms_incoming::auth::hash(line.trim_end_matches(['\r', '\n'])) {
        Ok(h) => {
            println!("{user}:{h}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qms: {e}");
            ExitCode::from(70)
        }
    }
}

fn newaliases(cfg: &Config) -> ExitCode {
    match &cfg.aliases {
        None => {
            println!("no aliases file configured");
            ExitCode::SUCCESS
        }
        Some(p) => match qms_common::aliases::Aliases::load(p) {
            Ok(a) => {
                for w in &a.warnings {
                    eprintln!("newaliases: warning: {}: {w}", p.display());
                }
                println!("{}: {} aliases", p.display(), a.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("newaliases: {e}");
                ExitCode::from(65)
            }
        },
    }
}

fn sendmail(explicit: Option<&Path>, args: &[String]) -> ExitCode {
    use qms_incoming::sendmail as sm;
    let a = match sm::parse_args(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sendmail: {e}");
            return ExitCode::from(sm::EX_USAGE as u8);
        }
    };
    // Any config will do: sendmail has no privilege of its own (qms-postdrop reads only
    // the system config for users other than root).
    let explicit = a.config.as_deref().map(Path::new).or(explicit);
    let path = qms_common::config::locate(explicit);
    let cfg = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sendmail: {e}");
            return ExitCode::from(sm::EX_CONFIG as u8);
        }
    };
    match a.mode {
        sm::Mode::ListQueue => queuetool::run(&cfg, queuetool::QueueCmd::list_all()),
        sm::Mode::Newaliases => newaliases(&cfg),
        _ => {
            qms_common::metrics::start(&cfg);
            let code = sm::run(&cfg, args, &a);
            // What it counted goes before it exits: it never lives to the next flush.
            qms_common::metrics::finish(&cfg);
            ExitCode::from(code as u8)
        }
    }
}
