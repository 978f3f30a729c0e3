//! `qms metrics`: the Prometheus endpoint (`[metrics] listen`, `GET /metrics`, text format
//! 0.0.4). It adds up what every process sends it (`qms_common::metrics`) and counts the
//! queue itself, from the names of the job files (a queue id tells its arrival), at most
//! once every few seconds however many scrapers ask.
//!
//! Runs as the mail system's user, like every role, and binds its port itself: the port is
//! 1024 or more (`check-config` says so). Requests are read with a bound and a timeout, and
//! at most a few are served at once.

use qms_common::log::quote;
use qms_common::metrics::series;
use qms_common::{qlog, Config};
use qms_spool::Spool;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The families served, with their type and help; series of any other name are dropped.
const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "qms_messages_received_total",
        "counter",
        "Messages accepted into the queue, by protocol.",
    ),
    (
        "qms_deliveries_total",
        "counter",
        "Delivery attempts, one per recipient, by queue and result (sent, deferred, bounced).",
    ),
    (
        "qms_destination_deliveries_total",
        "counter",
        "Delivery attempts by recipient domain: the 20 busiest, the rest as other.",
    ),
    (
        "qms_delivery_delay_seconds",
        "histogram",
        "Time from arrival to delivery of each recipient delivered, by queue.",
    ),
    (
        "qms_connections_total",
        "counter",
        "SMTP sessions accepted, by service.",
    ),
    (
        "qms_tls_sessions_total",
        "counter",
        "SMTP sessions that started TLS, by service.",
    ),
    (
        "qms_auth_failures_total",
        "counter",
        "Failed AUTH attempts, by service.",
    ),
    (
        "qms_rejects_total",
        "counter",
        "Recipients refused in the SMTP dialogue.",
    ),
    (
        "qms_auth_results_total",
        "counter",
        "Results of [auth_checks] on arriving messages, by method (spf, dkim, dmarc) and result.",
    ),
    (
        "qms_queue_messages",
        "gauge",
        "Jobs in each queue, by state (waiting, held) and age.",
    ),
    (
        "qms_workers",
        "gauge",
        "Delivery processes running, by queue.",
    ),
    (
        "qms_tracker_lag_seconds",
        "gauge",
        "Age of the oldest event the tracker took in its last pass (0 when none waited).",
    ),
    (
        "qms_tracker_events_total",
        "counter",
        "Tracking events stored in the database.",
    ),
];

/// Destinations shown by name; the others are summed as `other`.
const TOP_DESTINATIONS: usize = 20;
/// Destination series kept by name at most: beyond them, a new domain counts as `other`, so
/// a sender to millions of domains does not grow this process without end.
const MAX_DESTINATION_SERIES: usize = 5_000;
/// At most this many requests are served at once; more are closed at once.
const MAX_CLIENTS: usize = 4;
/// How long a queue count is served before the spool is read again.
const QUEUE_CACHE: Duration = Duration::from_secs(5);
/// Ages of `qms_queue_messages`: the label and the upper bound in seconds.
const AGES: [(&str, u64); 5] = [
    ("5m", 300),
    ("1h", 3600),
    ("4h", 14_400),
    ("1d", 86_400),
    ("older", u64::MAX),
];

#[derive(Default)]
struct Totals {
    counters: HashMap<String, f64>,
    gauges: HashMap<String, f64>,
}

struct State {
    totals: Mutex<Totals>,
    queue: Mutex<Option<(Instant, String)>>,
    spool: Spool,
    queues: Vec<String>,
    clients: AtomicUsize,
}

pub fn run(cfg: &Config, spool: Spool) -> std::process::ExitCode {
    let Some(addr) = cfg.metrics_listen else {
        qlog!("status=fatal reason=\"[metrics] listen is not set\"");
        return std::process::ExitCode::from(78);
    };
    let path = qms_common::metrics::socket_path(&cfg.spool);
    let _ = std::fs::remove_file(&path);
    let counts = match UnixDatagram::bind(&path) {
        Ok(s) => s,
        Err(e) => {
            qlog!(
                "status=fatal reason={}",
                quote(&format!("{}: {e}", path.display()))
            );
            return std::process::ExitCode::from(71);
        }
    };
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            qlog!(
                "status=fatal reason={}",
                quote(&format!("cannot listen on {addr}: {e}"))
            );
            return std::process::ExitCode::from(71);
        }
    };
    qlog!("event=listen service=metrics addr={addr}");
    let state = Arc::new(State {
        totals: Mutex::new(Totals::default()),
        queue: Mutex::new(None),
        spool,
        queues: cfg.queue_names(),
        clients: AtomicUsize::new(0),
    });
    {
        let state = state.clone();
        std::thread::spawn(move || receive(&counts, &state));
    }
    let _ = listener.set_nonblocking(true);
    while !crate::signals::stopping() {
        match listener.accept() {
            Ok((stream, _)) => {
                if state.clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    state.clients.fetch_sub(1, Ordering::SeqCst);
                    continue; // dropped: closes the connection
                }
                let state = state.clone();
                std::thread::spawn(move || {
                    serve(stream, &state);
                    state.clients.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let _ = std::fs::remove_file(&path);
    std::process::ExitCode::SUCCESS
}

/// Adds up the processes' datagrams: `c SERIES DELTA` and `g SERIES VALUE` lines.
fn receive(sock: &UnixDatagram, state: &State) {
    let mut buf = vec![0u8; 65_536];
    while let Ok(n) = sock.recv(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]);
        let Ok(mut t) = state.totals.lock() else {
            return;
        };
        for line in text.lines() {
            let mut parts = line.splitn(2, ' ');
            let (Some(kind), Some(rest)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Some((series, value)) = rest.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            if family_of(series).is_none() {
                continue;
            }
            let series = bounded(&t.counters, series);
            match kind {
                "c" => *t.counters.entry(series).or_default() += v,
                "g" => {
                    t.gauges.insert(series, v);
                }
                _ => {}
            }
        }
    }
}

/// The series to add to: itself, or for a new destination beyond `MAX_DESTINATION_SERIES`,
/// its `domain="other"` twin.
fn bounded(counters: &HashMap<String, f64>, series: &str) -> String {
    const NAME: &str = "qms_destination_deliveries_total";
    if !series.starts_with(NAME) || counters.contains_key(series) {
        return series.to_string();
    }
    let known = counters.keys().filter(|s| s.starts_with(NAME)).count();
    if known < MAX_DESTINATION_SERIES {
        return series.to_string();
    }
    qms_common::metrics::series(
        NAME,
        &[("domain", "other"), ("status", &label(series, "status"))],
    )
}

/// The family a series belongs to, if it is one served.
fn family_of(series: &str) -> Option<&'static (&'static str, &'static str, &'static str)> {
    let name = series.split('{').next().unwrap_or(series);
    FAMILIES.iter().find(|(f, kind, _)| {
        name == *f
            || (*kind == "histogram"
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(f)))
    })
}

/// One request: `GET /metrics` gets the page, anything else a short refusal.
fn serve(mut stream: TcpStream, state: &State) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&req);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", page(state)),
        ("GET", _) => ("404 Not Found", "try /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "GET only\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
}

/// The whole page, family by family.
fn page(state: &State) -> String {
    let queue = queue_series(state);
    let (mut counters, gauges) = match state.totals.lock() {
        Ok(t) => (t.counters.clone(), t.gauges.clone()),
        Err(_) => Default::default(),
    };
    top_destinations(&mut counters);
    let mut out = String::new();
    for (name, kind, help) in FAMILIES {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        if *name == "qms_queue_messages" {
            out.push_str(&queue);
            continue;
        }
        let mut lines: Vec<String> = counters
            .iter()
            .chain(gauges.iter())
            .filter(|(s, _)| family_of(s).is_some_and(|f| f.0 == *name))
            .map(|(s, v)| format!("{s} {v}\n"))
            .collect();
        lines.sort();
        out.extend(lines);
    }
    out
}

/// Folds every destination beyond the busiest into `domain="other"`.
fn top_destinations(counters: &mut HashMap<String, f64>) {
    const NAME: &str = "qms_destination_deliveries_total";
    let mut per_domain: HashMap<String, f64> = HashMap::new();
    for (s, v) in counters.iter().filter(|(s, _)| s.starts_with(NAME)) {
        *per_domain.entry(label(s, "domain")).or_default() += v;
    }
    if per_domain.len() <= TOP_DESTINATIONS {
        return;
    }
    let mut ranked: Vec<(String, f64)> = per_domain.into_iter().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let keep: Vec<String> = ranked
        .into_iter()
        .take(TOP_DESTINATIONS)
        .map(|(d, _)| d)
        .collect();
    let folded: Vec<(String, f64)> = counters
        .iter()
        .filter(|(s, _)| s.starts_with(NAME) && !keep.contains(&label(s, "domain")))
        .map(|(s, v)| (s.clone(), *v))
        .collect();
    for (s, v) in folded {
        counters.remove(&s);
        let other = series(
            NAME,
            &[("domain", "other"), ("status", &label(&s, "status"))],
        );
        *counters.entry(other).or_default() += v;
    }
}

/// The value of label `key` in a series this program wrote (values hold no `"`).
fn label(series: &str, key: &str) -> String {
    series
        .split(&format!("{key}=\""))
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("")
        .to_string()
}

/// `qms_queue_messages` for every queue, state and age, read from the spool at most once
/// per `QUEUE_CACHE`: concurrent scrapes wait for one read instead of each making one.
fn queue_series(state: &State) -> String {
    let Ok(mut cache) = state.queue.lock() else {
        return String::new();
    };
    if let Some((at, text)) = cache.as_ref() {
        if at.elapsed() < QUEUE_CACHE {
            return text.clone();
        }
    }
    let now = qms_common::time::now_micros();
    let mut text = String::new();
    for q in &state.queues {
        let areas: [(&[&str], &str); 2] =
            [(&["queue", "deferred"], "waiting"), (&["hold"], "held")];
        for (names, st) in areas {
            let mut n = [0u64; AGES.len()];
            for id in names.iter().flat_map(|a| state.spool.list(a, q)) {
                let age = now.saturating_sub(id.arrival_micros()) / 1_000_000;
                let i = AGES
                    .iter()
                    .position(|(_, max)| age < *max)
                    .unwrap_or(AGES.len() - 1);
                n[i] += 1;
            }
            for ((age, _), count) in AGES.iter().zip(n) {
                let s = series(
                    "qms_queue_messages",
                    &[("queue", q), ("state", st), ("age", age)],
                );
                text.push_str(&format!("{s} {count}\n"));
            }
        }
    }
    *cache = Some((Instant::now(), text.clone()));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_beyond_the_cap_count_as_other() {
        let name = "qms_destination_deliveries_total";
        let mut counters = HashMap::new();
        for i in 0..MAX_DESTINATION_SERIES {
            let s = series(
                name,
                &[("domain", &format!("d{i}.test")), ("status", "sent")],
            );
            counters.insert(s, 1.0);
        }
        let known = series(name, &[("domain", "d7.test"), ("status", "sent")]);
        assert_eq!(bounded(&counters, &known), known);
        let new = series(name, &[("domain", "new.test"), ("status", "bounced")]);
        assert_eq!(
            bounded(&counters, &new),
            series(name, &[("domain", "other"), ("status", "bounced")])
        );
        let other = series("qms_connections_total", &[("service", "smtp")]);
        assert_eq!(bounded(&counters, &other), other);
    }
}
