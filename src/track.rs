//! `qms track`: what happened to each recipient of a message, from the tracking database
//! (the spool's SQLite, or the PostgreSQL a fleet shares, with the node of each event).

use qms_common::Config;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct TrackArgs {
    /// A queue id, a Message-ID (angle brackets optional) or an X-B-CrossRef; all when absent.
    id: Option<String>,
    /// One JSON object per event, one per line.
    #[arg(long)]
    json: bool,
    #[arg(long)]
    recipient: Option<String>,
    /// An event or a state reached: received, routed, relayed, delivered, deferred, failed, …
    #[arg(long)]
    state: Option<String>,
    /// Unix seconds.
    #[arg(long)]
    since: Option<i64>,
    #[arg(long)]
    until: Option<i64>,
    /// Only what this node of a fleet did.
    #[arg(long)]
    node: Option<String>,
}

pub fn run(cfg: &Config, a: TrackArgs) -> ExitCode {
    if let Err(e) = qms_common::privs::drop_to(cfg.user.as_deref()) {
        eprintln!("qms: {e}");
        return ExitCode::from(71);
    }
    let path = qms_tracker::db_path(&cfg.spool);
    if cfg.tracking.database.is_none() && !path.exists() {
        eprintln!(
            "qms: no tracking database at {} (is `qms start` running?)",
            path.display()
        );
        return ExitCode::from(1);
    }
    let db = match qms_tracker::Db::connect(cfg) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("qms: {e}");
            return ExitCode::from(73);
        }
    };
    let q = qms_tracker::Query {
        id: a.id.clone(),
        recipient: a.recipient,
        state: a.state,
        since: a.since,
        until: a.until,
        node: a.node,
    };
    let events = match db.history(&q) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("qms: {e}");
            return ExitCode::from(1);
        }
    };
    if events.is_empty() {
        eprintln!(
            "qms: no tracking events{}",
            a.id.map(|i| format!(" for {i}")).unwrap_or_default()
        );
        return ExitCode::from(1);
    }
    if a.json {
        for e in &events {
            println!("{}", serde_json::to_string(e).unwrap_or_default());
        }
        return ExitCode::SUCCESS;
    }
    let mut last = String::new();
    for e in &events {
        if e.recipient != last {
            println!("{}{}", if last.is_empty() { "" } else { "\n" }, e.recipient);
            last = e.recipient.clone();
        }
        println!("{}", event_line(e, cfg.tracking.database.is_some()));
    }
    lags(&db);
    ExitCode::SUCCESS
}

/// One event as `qms track` prints it; `shared`: several nodes share the database.
fn event_line(e: &qms_common::track::Event, shared: bool) -> String {
    let when = qms_common::time::iso8601((e.time / 1_000_000) as i64);
    let from = if e.from.is_empty() { "-" } else { &e.from };
    let mut line = format!(
        "  {when} {:<13} {from} -> {:<10} qid={}",
        e.event, e.to, e.qid
    );
    if let Some(r) = &e.relay {
        line.push_str(&format!(" relay={r}"));
    }
    if let Some(n) = e.attempt {
        line.push_str(&format!(" attempt={n}"));
    }
    if let Some(r) = &e.reason {
        line.push_str(&format!(" reason=\"{r}\""));
    }
    if !e.role.is_empty() {
        line.push_str(&format!(" by={}", e.role));
    }
    // A node is named where several share the database.
    if shared && !e.node.is_empty() {
        line.push_str(&format!(" node={}", e.node));
    }
    if let Some(r) = &e.reply {
        line.push_str(&format!(" ({r})"));
    }
    line
}

/// Each node's tracker lag, when the database is shared by several.
fn lags(db: &qms_tracker::Db) {
    let Ok(lags) = db.lags() else { return };
    if lags.len() < 2 {
        return;
    }
    println!();
    for l in lags {
        println!(
            "node {}: tracker lag {:.1}s at {}",
            l.node,
            l.lag,
            qms_common::time::iso8601(l.updated)
        );
    }
}
