//! `qms queue …` and `mailq`: what sysadmins reach for in postqueue, postsuper and qshape.
//! Everything here is safe while workers run: reads are snapshots, changes take the job's lock.

use clap::{Args, Subcommand};
use qms_common::address::show_sender;
use qms_common::log::quote;
use qms_common::{qlog, time, Config};
use qms_spool::{Claim, Job, QueueId, Spool};
use std::process::ExitCode;
use std::time::Duration;

mod act;
mod shape;

use act::{act, Action};
use shape::{shape, Shape};

#[derive(Subcommand)]
pub enum QueueCmd {
    /// List queued messages (what mailq shows).
    List(ListArgs),
    /// Show one message: envelope, per-recipient state, headers (and --body).
    Show {
        id: String,
        #[arg(long)]
        body: bool,
    },
    /// Put messages on hold: kept, not delivered, until released.
    Hold(Select),
    /// Release held messages back into their queue.
    Release(Select),
    /// Delete messages from the queue.
    Delete(Select),
    /// Try messages again now instead of at their next scheduled time.
    Retry(Select),
    /// Route messages again with the config in force (postsuper -r): each gets a new queue id.
    Requeue(Select),
    /// Recipient counts per destination domain by age, like qshape.
    Shape {
        #[arg(long)]
        queue: Option<String>,
        /// By sender domain instead (qshape -s).
        #[arg(short = 's', long)]
        sender: bool,
        /// Parent domains too, with a leading dot (qshape -p).
        #[arg(short = 'p', long)]
        parents: bool,
        /// Only the N largest rows; the rest are summed in one line.
        #[arg(short = 'n', long)]
        top: Option<usize>,
    },
}

#[derive(Args, Default)]
pub struct ListArgs {
    /// One JSON object per message, one per line.
    #[arg(long)]
    json: bool,
    #[arg(long)]
    queue: Option<String>,
    #[arg(long)]
    sender: Option<String>,
    #[arg(long)]
    recipient: Option<String>,
    /// Recipient domain.
    #[arg(long)]
    domain: Option<String>,
    /// Only messages older than this: seconds, or with a unit (90s, 5m, 4h, 2d).
    #[arg(long, value_parser = age)]
    older_than: Option<i64>,
}

#[derive(Args)]
pub struct Select {
    pub(crate) ids: Vec<String>,
    /// Every message (of --queue, if given).
    #[arg(long)]
    pub(crate) all: bool,
    #[arg(long)]
    pub(crate) queue: Option<String>,
}

impl QueueCmd {
    pub fn list_all() -> QueueCmd {
        QueueCmd::List(ListArgs::default())
    }
}

/// A job as found on disk, with where it sits.
struct Found {
    area: &'static str,
    job: Job,
}

fn all_jobs(spool: &Spool, queue: Option<&str>) -> Vec<Found> {
    let mut out = Vec::new();
    for q in spool.queues() {
        if queue.is_some_and(|want| want != q) {
            continue;
        }
        for area in qms_spool::JOB_AREAS {
            for id in spool.list(area, &q) {
                match spool.load(area, &q, &id) {
                    Ok(job) => out.push(Found { area, job }),
                    Err(qms_spool::SpoolError::NotFound(_)) => {}
                    Err(e) => eprintln!("qms: {e}"),
                }
            }
        }
    }
    out.sort_by(|a, b| a.job.id.cmp(&b.job.id));
    out
}

/// True when this process may read the spool and act on it: root, the qms user, or anyone
/// on an instance without a `user` (unprivileged, as in examples/qms.toml).
fn age(s: &str) -> Result<i64, String> {
    time::parse_duration(s).and_then(|d| i64::try_from(d).map_err(|e| e.to_string()))
}

/// The queue a command is limited to, if it names one.
fn named_queue(cmd: &QueueCmd) -> Option<&str> {
    match cmd {
        QueueCmd::List(a) => a.queue.as_deref(),
        QueueCmd::Shape { queue, .. } => queue.as_deref(),
        QueueCmd::Hold(s)
        | QueueCmd::Release(s)
        | QueueCmd::Delete(s)
        | QueueCmd::Retry(s)
        | QueueCmd::Requeue(s) => s.queue.as_deref(),
        QueueCmd::Show { .. } => None,
    }
}

fn may_manage(cfg: &Config) -> bool {
    let uid = nix::unistd::getuid();
    uid.is_root()
        || match &cfg.user {
            None => true,
            Some(u) => qms_common::privs::Account::lookup(u).is_ok_and(|a| a.uid == uid),
        }
}

pub fn run(cfg: &Config, cmd: QueueCmd) -> ExitCode {
    qms_common::log::init("queue");
    // What an administrator does to the queue is logged with the daemon's lines (the mail
    // log), not on the terminal, which gets a one-line summary.
    qms_common::log::for_command(cfg);
    let by = user();
    if let Some(q) = named_queue(&cmd).filter(|q| !cfg.queues.contains_key(*q)) {
        eprintln!(
            "qms: no queue {q:?} (queues: {})",
            cfg.queue_names().join(", ")
        );
        return ExitCode::from(64);
    }
    if !may_manage(cfg) {
        return match cmd {
            // Everyone may see the envelopes, as with Postfix's mailq, through showq.
            QueueCmd::List(a) => match crate::showq::fetch(cfg) {
                Ok(docs) => render(docs, &a),
                Err(e) => {
                    eprintln!("mailq: {e}");
                    ExitCode::from(69)
                }
            },
            _ => {
                eprintln!(
                    "qms: permission denied: only root and the mail system's user ({}) may look into messages or change the queue; `mailq` lists it for everyone",
                    cfg.user.as_deref().unwrap_or("?")
                );
                ExitCode::from(77)
            }
        };
    }
    if let Err(e) = qms_common::privs::drop_to(cfg.user.as_deref()) {
        eprintln!("qms: {e}");
        return ExitCode::from(71);
    }
    let spool = match Spool::open(&cfg.spool, &cfg.queue_names()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("qms: {e}");
            return ExitCode::from(73);
        }
    };
    if matches!(
        cmd,
        QueueCmd::Hold(_)
            | QueueCmd::Release(_)
            | QueueCmd::Delete(_)
            | QueueCmd::Retry(_)
            | QueueCmd::Requeue(_)
    ) {
        let _ = qms_common::track::open(&cfg.spool, "queue");
    }
    match cmd {
        QueueCmd::List(a) => render(envelope_docs(&spool, a.queue.as_deref()), &a),
        QueueCmd::Show { id, body } => show(&spool, &id, body),
        QueueCmd::Hold(s) => act(&spool, &s, Action::Hold, &by),
        QueueCmd::Release(s) => act(&spool, &s, Action::Release, &by),
        QueueCmd::Delete(s) => act(&spool, &s, Action::Delete, &by),
        QueueCmd::Retry(s) => act(&spool, &s, Action::Retry, &by),
        QueueCmd::Requeue(s) => crate::requeue::run(&spool, &s, &by),
        QueueCmd::Shape {
            queue,
            sender,
            parents,
            top,
        } => shape(
            &spool,
            queue.as_deref(),
            Shape {
                sender,
                parents,
                top,
            },
        ),
    }
}

/// The envelope of every queued and held message, as `queue list --json` prints it: what
/// `mailq` shows to anyone, so never a body, a header or a credential.
pub fn envelope_docs(spool: &Spool, queue: Option<&str>) -> Vec<serde_json::Value> {
    all_jobs(spool, queue)
        .iter()
        .map(|f| {
            let j = &f.job;
            let rcpts: Vec<serde_json::Value> = j
                .recipients
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "address": r.address.to_string(),
                        "state": r.state.as_str(),
                        "reply": r.reply,
                        "delay_reason": r.reply,
                        "attempts": j.attempts,
                        "next_attempt": j.next_attempt,
                        "route": r.route,
                    })
                })
                .collect();
            // postqueue -j's names beside ours, so its scripts read this listing: its
            // queue_name says where Postfix would have the message.
            let queue_name = if f.area == "hold" {
                "hold"
            } else if j.queue == "incoming" {
                "incoming"
            } else if j.attempts > 0 {
                "deferred"
            } else {
                "active"
            };
            serde_json::json!({
                "id": j.id.as_str(),
                "queue": j.queue,
                "held": f.area == "hold",
                "size": j.size,
                "arrival": j.arrival,
                "sender": show_sender(&j.sender),
                "recipients": rcpts,
                "queue_name": queue_name,
                "queue_id": j.id.as_str(),
                "arrival_time": j.arrival,
                "message_size": j.size,
            })
        })
        .collect()
}

fn matches(d: &serde_json::Value, a: &ListArgs, now: i64) -> bool {
    let lc = |s: &str| s.to_ascii_lowercase();
    let rcpts = || {
        d["recipients"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["address"].as_str())
    };
    a.queue
        .as_ref()
        .is_none_or(|q| d["queue"].as_str() == Some(q))
        && a.sender
            .as_ref()
            .is_none_or(|s| lc(d["sender"].as_str().unwrap_or("")).contains(&lc(s)))
        && a.recipient
            .as_ref()
            .is_none_or(|r| rcpts().any(|x| lc(x).contains(&lc(r))))
        && a.domain.as_ref().is_none_or(|dom| {
            rcpts().any(|x| {
                x.rsplit_once('@')
                    .is_some_and(|(_, d)| d.eq_ignore_ascii_case(dom))
            })
        })
        && a.older_than
            .is_none_or(|age| now - d["arrival"].as_i64().unwrap_or(now) >= age)
}

/// Prints the listing: JSON lines, or mailq's table.
fn render(docs: Vec<serde_json::Value>, a: &ListArgs) -> ExitCode {
    let now = time::now();
    let docs: Vec<serde_json::Value> = docs.into_iter().filter(|d| matches(d, a, now)).collect();
    if a.json {
        for d in &docs {
            println!("{d}");
        }
        return ExitCode::SUCCESS;
    }
    if docs.is_empty() {
        println!("Mail queue is empty");
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<17} {:<9} {:>8} {:<20} Sender/Recipient",
        "-Queue ID-", "-Queue-", "-Size-", "-Arrival Time-"
    );
    let mut total = 0u64;
    for d in &docs {
        let size = d["size"].as_u64().unwrap_or(0);
        total += size;
        let held = if d["held"].as_bool() == Some(true) {
            "!"
        } else {
            " "
        };
        println!(
            "{}{held:<1} {:<9} {:>8} {:<20} {}",
            d["id"].as_str().unwrap_or("?"),
            d["queue"].as_str().unwrap_or("?"),
            size,
            time::iso8601(d["arrival"].as_i64().unwrap_or(0)),
            d["sender"].as_str().unwrap_or("")
        );
        for r in d["recipients"].as_array().into_iter().flatten() {
            let reply = r["reply"]
                .as_str()
                .map(|x| format!(" ({x})"))
                .unwrap_or_default();
            println!(
                "{:>47} {} [{}]{reply}",
                "",
                r["address"].as_str().unwrap_or("?"),
                r["state"].as_str().unwrap_or("?")
            );
        }
    }
    println!(
        "-- {} Kbytes in {} Requests.",
        total.div_ceil(1024),
        docs.len()
    );
    ExitCode::SUCCESS
}

pub(crate) fn parse_id(s: &str) -> Option<QueueId> {
    QueueId::parse(s.trim())
}

fn show(spool: &Spool, id: &str, body: bool) -> ExitCode {
    let Some(id) = parse_id(id) else {
        eprintln!("qms: {id:?} is not a queue id");
        return ExitCode::from(64);
    };
    let found: Vec<Found> = all_jobs(spool, None)
        .into_iter()
        .filter(|f| f.job.id == id)
        .collect();
    if found.is_empty() {
        eprintln!("qms: no message {id} in the queue");
        return ExitCode::from(1);
    }
    for f in &found {
        print_job(f);
    }
    match spool.read_body(&found[0].job) {
        Ok(msg) => {
            let end = msg
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|i| i + 2)
                .unwrap_or(msg.len());
            println!();
            let shown = if body { &msg[..] } else { &msg[..end] };
            print!("{}", String::from_utf8_lossy(shown).replace("\r\n", "\n"));
        }
        Err(e) => eprintln!("qms: {e}"),
    }
    ExitCode::SUCCESS
}

/// A job's envelope and state, a field a line, as `queue show` prints it.
fn print_job(f: &Found) {
    let j = &f.job;
    println!(
        "id: {}\nqueue: {}{}",
        j.id,
        j.queue,
        if f.area == "hold" { " (held)" } else { "" }
    );
    println!(
        "arrival: {}\nsender: {}\nsize: {}",
        time::iso8601(j.arrival),
        show_sender(&j.sender),
        j.size
    );
    println!("protocol: {}", j.protocol);
    if let Some(a) = &j.client.addr {
        println!(
            "client: [{a}] helo={}",
            j.client.helo.as_deref().unwrap_or("-")
        );
    }
    if let Some(u) = &j.client.local_user {
        println!("client: local user {u}");
    }
    if let Some(h) = &j.smarthost {
        println!("smarthost: {h}");
    }
    if j.debug {
        println!("run control: debug (SMTP dialogue logged)");
    }
    if !j.post_plugins.is_empty() {
        println!("post-plugins: {}", j.post_plugins.join(", "));
    }
    println!(
        "attempts: {}\nnext attempt: {}",
        j.attempts,
        time::iso8601(j.next_attempt)
    );
    println!(
        "warn at: {}\nexpires: {}",
        time::iso8601(j.warn_at),
        time::iso8601(j.expires_at)
    );
    for r in &j.recipients {
        let route = r
            .route
            .as_deref()
            .map(|x| format!(" via {x}"))
            .unwrap_or_default();
        let reply = r
            .reply
            .as_deref()
            .map(|x| format!(": {x}"))
            .unwrap_or_default();
        println!(
            "recipient: {} [{}]{route}{reply}",
            r.address,
            r.state.as_str()
        );
    }
}

fn user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_default()
}
