//! `qms status`: the processes of a running instance (from the supervisor's status file),
//! the depth of every queue, and whether the tracker keeps up.

use crate::supervisor::{running_pid, status_file};
use qms_common::Config;
use std::process::ExitCode;

pub fn run(cfg: &Config) -> ExitCode {
    let running = running_pid(cfg);
    match running {
        Some(pid) => println!(
            "qms is running: supervisor pid {pid}, spool {}",
            cfg.spool.display()
        ),
        None => println!("qms is not running (spool {})", cfg.spool.display()),
    }
    if running.is_some() {
        if let Ok(text) = std::fs::read_to_string(status_file(cfg)) {
            if let Ok(doc) = serde_json::from_str::<serde_json::Value>(&text) {
                println!("{:<24} {:>8}", "PROCESS", "PID");
                for p in doc["processes"].as_array().into_iter().flatten() {
                    let pid = p["pid"]
                        .as_i64()
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "restarting".into());
                    println!("{:<24} {:>8}", p["process"].as_str().unwrap_or("?"), pid);
                }
            }
        }
    }
    let spool = match qms_spool::Spool::open(&cfg.spool, &cfg.queue_names()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("qms: {e}");
            return ExitCode::from(73);
        }
    };
    println!("{:<24} {:>8} {:>8}", "QUEUE", "JOBS", "HELD");
    for q in spool.queues() {
        println!(
            "{:<24} {:>8} {:>8}",
            q,
            spool.list("queue", &q).len() + spool.list("deferred", &q).len(),
            spool.list("hold", &q).len()
        );
    }
    let corrupt: usize = spool
        .queues()
        .iter()
        .map(|q| spool.list("corrupt", q).len())
        .sum();
    if corrupt > 0 {
        println!(
            "corrupt jobs: {corrupt} (see {})",
            cfg.spool.join("corrupt").display()
        );
    }
    tracker_state(cfg);
    if running.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

/// Whether the tracker keeps up: how many event files wait, and why it is behind when it is.
fn tracker_state(cfg: &Config) {
    let waiting = std::fs::read_dir(cfg.spool.join("track"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
                .count()
        })
        .unwrap_or(0);
    let behind = std::fs::read_to_string(crate::roles::tracker_status_file(cfg))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    match behind {
        Some(doc) => println!(
            "tracker: behind since {} ({}); {waiting} event file(s) wait",
            qms_common::time::iso8601(doc["behind_since"].as_i64().unwrap_or(0)),
            doc["reason"].as_str().unwrap_or("?")
        ),
        None => println!("tracker: keeping up; {waiting} event file(s) open"),
    }
}
