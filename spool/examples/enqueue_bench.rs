//! Durable enqueue rate of the spool: 1 writer (one commit per message, the `sendmail` path)
//! and W writers sharing the group committer (the smtpd path), with 2 KiB messages.
//!
//!   cargo run --release -p qms-spool --example enqueue_bench -- DIR [SECONDS] [WRITERS] [PREFILL]
//!
//! With PREFILL > 0, that many jobs are queued first and the rates are measured again, to
//! show that enqueue cost does not grow with the queue.

use qms_common::config::Outgoing;
use qms_common::Address;
use qms_spool::{Client, Committer, Job, Recipient, Spool};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn job() -> Job {
    let timing = Outgoing {
        min_backoff: 300,
        max_backoff: 4000,
        delay_warning: 14400,
        max_queue_lifetime: 432000,
    };
    let rcpt = Recipient::new(Address::parse("rcpt@bench.test").expect("address"));
    let sender = Address::parse("sender@bench.test").ok();
    Job::new(
        "incoming",
        sender,
        vec![rcpt],
        Client::default(),
        "smtp",
        &timing,
    )
}

fn one_writer(spool: &Spool, secs: f64, body: &[u8]) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        spool.enqueue(job(), &|_| body.to_vec()).expect("enqueue");
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn many_writers(spool: &Spool, secs: f64, writers: usize, body: &[u8]) -> f64 {
    let committer = Committer::start(spool.clone());
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..writers)
        .map(|_| {
            let (spool, committer, count, stop, body) = (
                spool.clone(),
                committer.clone(),
                count.clone(),
                stop.clone(),
                body.to_vec(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let staged = spool.stage(job(), &|_| body.clone()).expect("stage");
                    committer.commit(staged).expect("commit");
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn prefill(spool: &Spool, n: usize, body: &[u8]) {
    let mut left = n;
    while left > 0 {
        let batch: Vec<_> = (0..left.min(1000))
            .map(|_| spool.stage(job(), &|_| body.to_vec()).expect("stage"))
            .collect();
        left -= batch.len();
        for r in spool.commit(batch).expect("commit") {
            r.expect("commit");
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("bench-spool"));
    let secs: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let writers: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(16);
    let fill: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(0);
    let _ = std::fs::remove_dir_all(&dir);
    let spool = Spool::open(&dir, &["incoming".to_string()]).expect("spool");
    let body: Vec<u8> = (0..2048)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz\r\n"[i % 28])
        .collect();
    let r1 = one_writer(&spool, secs, &body);
    let rw = many_writers(&spool, secs, writers, &body);
    println!("queued=empty enqueue_per_s_1={r1:.0} enqueue_per_s_{writers}={rw:.0}");
    if fill > 0 {
        let t = Instant::now();
        prefill(&spool, fill, &body);
        let depth = spool.list("queue", "incoming").len();
        eprintln!("prefilled {fill} jobs in {:.1}s", t.elapsed().as_secs_f64());
        let r1 = one_writer(&spool, secs, &body);
        let rw = many_writers(&spool, secs, writers, &body);
        println!("queued={depth} enqueue_per_s_1={r1:.0} enqueue_per_s_{writers}={rw:.0}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
