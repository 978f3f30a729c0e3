//! `qms queue shape`: the queue by destination domain (or sender) and age, in qshape's
//! buckets.

use super::*;

/// How `queue shape` groups and cuts its rows.
pub(super) struct Shape {
    pub(super) sender: bool,
    pub(super) parents: bool,
    pub(super) top: Option<usize>,
}

/// The domain and, with `parents`, its parents with a leading dot (`a.b.c` → `.b.c`, `.c`).
fn shape_keys(domain: &str, parents: bool) -> Vec<String> {
    let mut keys = vec![domain.to_ascii_lowercase()];
    if parents {
        let mut rest = domain;
        while let Some(i) = rest.find('.') {
            rest = &rest[i + 1..];
            keys.push(format!(".{}", rest.to_ascii_lowercase()));
        }
    }
    keys
}

pub(super) fn shape(spool: &Spool, queue: Option<&str>, how: Shape) -> ExitCode {
    // qshape's buckets, in minutes: 0-5, 5-10, 10-20, … doubling.
    const EDGES: [i64; 9] = [5, 10, 20, 40, 80, 160, 320, 640, 1280];
    let now = time::now();
    let mut rows: std::collections::BTreeMap<String, [usize; 10]> = Default::default();
    let mut totals = [0usize; 10];
    let mut held = 0;
    for f in all_jobs(spool, queue) {
        if f.area == "hold" {
            held += 1;
            continue;
        }
        let mins = (now - f.job.arrival) / 60;
        let bucket = EDGES.iter().position(|e| mins < *e).unwrap_or(EDGES.len());
        let sender_domain = f.job.sender.as_ref().map(|a| a.domain().to_string());
        for r in f.job.pending() {
            totals[bucket] += 1;
            let domain = match (&sender_domain, how.sender) {
                (Some(d), true) => d.clone(),
                (None, true) => "MAILER-DAEMON".to_string(),
                (_, false) => r.address.domain().to_string(),
            };
            for key in shape_keys(&domain, how.parents) {
                rows.entry(key).or_insert([0; 10])[bucket] += 1;
            }
        }
    }
    let mut order: Vec<(&String, &[usize; 10])> = rows.iter().collect();
    order.sort_by_key(|(_, c)| std::cmp::Reverse(c.iter().sum::<usize>()));
    print!("{:<32} {:>6}", "", "T");
    for e in EDGES {
        print!(" {e:>5}");
    }
    println!(" {:>5}", "1280+");
    let line = |name: &str, c: &[usize; 10]| {
        print!("{name:<32} {:>6}", c.iter().sum::<usize>());
        for n in c {
            print!(" {n:>5}");
        }
        println!();
    };
    line("TOTAL", &totals);
    let shown = how.top.unwrap_or(usize::MAX).min(order.len());
    for (d, c) in &order[..shown] {
        line(d, c);
    }
    // Say what the table leaves out, so that its figures are not misread.
    let rest = order.len() - shown;
    if rest > 0 {
        let mut others = [0usize; 10];
        for (_, c) in &order[shown..] {
            for (t, n) in others.iter_mut().zip(c.iter()) {
                *t += n;
            }
        }
        line(&format!("({rest} more)"), &others);
    }
    println!(
        "Counts are recipients still to deliver, by {} domain and minutes queued{}; held messages are left out ({held} held).",
        if how.sender { "sender" } else { "recipient" },
        if how.parents { ", parents with a leading dot (also counted in their subdomains' rows)" } else { "" }
    );
    ExitCode::SUCCESS
}
