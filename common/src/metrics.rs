//! What each process counts for Prometheus (`[metrics] listen`): counters, gauges and
//! histograms kept in memory and sent once a second, as deltas, to the `metrics` role over
//! a datagram socket in the spool's `run/` directory, which only the mail system's user
//! (and root) may reach. A send that fails keeps its deltas for the next one, so nothing
//! counted is lost while the process lives; nothing here ever blocks or fails mail.
//!
//! The wire format is text, one series per line: `c NAME{LABELS} DELTA` adds to a counter,
//! `g NAME{LABELS} VALUE` sets a gauge.

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

static ON: AtomicBool = AtomicBool::new(false);
static STORE: Mutex<Option<Store>> = Mutex::new(None);

#[derive(Default)]
struct Store {
    counters: HashMap<String, f64>,
    gauges: HashMap<String, f64>,
    /// Histograms by name and labels, turned into counter lines only when sent.
    hists: HashMap<(String, String), Hist>,
}

/// Observations since the last flush: one count per bucket of `DELAY_BUCKETS`, then +Inf.
#[derive(Default, Clone)]
struct Hist {
    buckets: [f64; DELAY_BUCKETS.len() + 1],
    sum: f64,
}

/// The bounds of the delivery delay histogram, in seconds: from a local delivery to a
/// message that waited days.
pub const DELAY_BUCKETS: [f64; 11] = [
    0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 14_400.0, 86_400.0,
];

/// Where the `metrics` role listens for the processes' counts.
pub fn socket_path(spool: &Path) -> PathBuf {
    spool.join("run/metrics.sock")
}

/// Starts counting for this process when the config has a metrics listener; otherwise every
/// call below returns at once.
pub fn start(cfg: &crate::Config) {
    if cfg.metrics_listen.is_none() || ON.swap(true, Ordering::SeqCst) {
        return;
    }
    let path = socket_path(&cfg.spool);
    let _ = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            flush(&path);
        });
}

/// `name{k="v",…}` with label values escaped as the text format wants.
pub fn series(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{name}{{{}}}", inner.join(","))
}

fn with_store(f: impl FnOnce(&mut Store)) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    if let Ok(mut g) = STORE.lock() {
        f(g.get_or_insert_with(Store::default));
    }
}

/// Adds `by` to a counter.
pub fn count(name: &str, labels: &[(&str, &str)], by: f64) {
    with_store(|s| *s.counters.entry(series(name, labels)).or_default() += by);
}

/// Sets a gauge.
pub fn gauge(name: &str, labels: &[(&str, &str)], value: f64) {
    with_store(|s| {
        s.gauges.insert(series(name, labels), value);
    });
}

/// Records one value of a histogram with `DELAY_BUCKETS`: its buckets, sum and count.
pub fn observe(name: &str, labels: &[(&str, &str)], value: f64) {
    with_store(|s| {
        let h = s
            .hists
            .entry((name.to_string(), series("", labels)))
            .or_default();
        let first = DELAY_BUCKETS
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(DELAY_BUCKETS.len());
        for b in &mut h.buckets[first..] {
            *b += 1.0;
        }
        h.sum += value;
    });
}

/// A histogram's deltas as counters: `_bucket` per bound (cumulative, as Prometheus wants),
/// `_sum` and `_count`.
fn hist_counters(counters: &mut HashMap<String, f64>, name: &str, labels: &str, h: &Hist) {
    let inner = labels.trim_start_matches('{').trim_end_matches('}');
    let sep = if inner.is_empty() { "" } else { "," };
    let bounds = DELAY_BUCKETS
        .iter()
        .map(|b| b.to_string())
        .chain(["+Inf".to_string()]);
    for (le, n) in bounds.zip(h.buckets) {
        *counters
            .entry(format!("{name}_bucket{{{inner}{sep}le=\"{le}\"}}"))
            .or_default() += n;
    }
    *counters.entry(format!("{name}_sum{labels}")).or_default() += h.sum;
    *counters.entry(format!("{name}_count{labels}")).or_default() += h.buckets[DELAY_BUCKETS.len()];
}

/// Sends what was counted since the last flush; what cannot be sent is kept for the next.
pub fn flush(path: &Path) {
    let (mut counters, gauges, hists) = {
        let Ok(mut g) = STORE.lock() else { return };
        let s = g.get_or_insert_with(Store::default);
        (
            std::mem::take(&mut s.counters),
            s.gauges.clone(),
            std::mem::take(&mut s.hists),
        )
    };
    for ((name, labels), h) in &hists {
        hist_counters(&mut counters, name, labels, h);
    }
    let mut lines: Vec<(Option<&String>, String)> = counters
        .iter()
        .filter(|(_, v)| **v != 0.0)
        .map(|(k, v)| (Some(k), format!("c {k} {v}\n")))
        .collect();
    lines.extend(gauges.iter().map(|(k, v)| (None, format!("g {k} {v}\n"))));
    let sent = send(path, &lines);
    if sent == lines.len() {
        return;
    }
    // Not sent: those deltas go back, added to what was counted meanwhile.
    if let Ok(mut g) = STORE.lock() {
        let s = g.get_or_insert_with(Store::default);
        for (k, _) in &lines[sent..] {
            if let Some(k) = k {
                *s.counters.entry((*k).clone()).or_default() += counters[*k];
            }
        }
    }
}

/// Sends the lines in datagrams of at most 8 KiB; returns how many lines went out before a
/// send failed (all of them when none did).
fn send(path: &Path, lines: &[(Option<&String>, String)]) -> usize {
    let Ok(sock) = UnixDatagram::unbound() else {
        return 0;
    };
    if sock.set_nonblocking(true).is_err() {
        return 0;
    }
    let (mut start, mut buf) = (0, String::new());
    for (i, (_, l)) in lines.iter().enumerate() {
        if buf.len() + l.len() > 8192 && !buf.is_empty() {
            if sock.send_to(buf.as_bytes(), path).is_err() {
                return start;
            }
            buf.clear();
            start = i;
        }
        buf.push_str(l);
    }
    if !buf.is_empty() && sock.send_to(buf.as_bytes(), path).is_err() {
        return start;
    }
    lines.len()
}

/// Sends what is left before a short-lived process (`sendmail`) exits.
pub fn finish(cfg: &crate::Config) {
    if ON.load(Ordering::Relaxed) {
        flush(&socket_path(&cfg.spool));
    }
}
