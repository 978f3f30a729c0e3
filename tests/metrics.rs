//! `[metrics] listen` (issue #14): Prometheus scrapes `/metrics`, and the counters match what
//! the test did, read with a real parser (Python prometheus_client's text parser).

mod common;
use common::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

/// One sample: its labels and value, from prometheus_client's parser.
type Samples = Vec<(String, HashMap<String, String>, f64)>;

fn get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn scrape(port: u16) -> Samples {
    let page = get(port, "/metrics");
    let body = page.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let script = r#"
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.argv[1]):
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let (ok, out) = python(script, &[body.to_string()]);
    assert!(ok, "the parser refused the page: {out}\n{body}");
    let v: Vec<(String, HashMap<String, String>, f64)> = serde_json::from_str(out.trim()).unwrap();
    v
}

fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

#[test]
fn metrics_are_scraped_and_count_what_was_sent() {
    let (ok_port, bad_port, port) = (free_port(), free_port(), free_port());
    let mut inst = relay_instance(
        &[("ok.test", ok_port), ("bad.test", bad_port)],
        &format!(
            "\"slow.test\" = \"pipe:exit 75\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\
             [tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
             [auth]\nusers = \"users\"\nplaintext_loopback = true\nmax_failures = 100\n"
        ),
    );
    inst.edit_config("relay = [", "relay = [\"slow.test\", ");
    make_cert(&inst.dir, "mx.example.test");
    std::fs::write(inst.dir.join("users"), passwd_line("alice", "right")).unwrap();
    let _ok = Sink::start(&inst, "ok", "127.0.0.1", ok_port, &[]);
    let _bad = Sink::start(&inst, "bad", "127.0.0.1", bad_port, &["-f", "RCPT"]);
    inst.own();
    inst.start();
    let script = r#"
import smtplib, ssl, sys, base64
port = int(sys.argv[1])
def send(to, tls=False):
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    s.ehlo("client.test")
    if tls:
        s.starttls(context=ssl._create_unverified_context())
        s.ehlo("client.test")
    s.sendmail("bob@example.test", [to], "Subject: m\r\n\r\nbody\r\n")
    s.quit()
for _ in range(3): send("alice@example.test")
send("alice@example.test", tls=True)
for _ in range(2): send("x@ok.test")
send("y@bad.test")
send("z@slow.test")
s = smtplib.SMTP("127.0.0.1", port, timeout=30)
s.ehlo("client.test")
s.mail("bob@example.test")
assert s.rcpt("nobody@elsewhere.test")[0] == 554
s.quit()
for _ in range(2):
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    s.ehlo("client.test")
    assert s.docmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong").decode())[0] == 535
    s.quit()
"#;
    let (ok, out) = python(script, &[inst.smtp_port.to_string()]);
    assert!(ok, "{out}");
    for _ in 0..2 {
        assert!(inst
            .sendmail(&["alice@example.test"], b"Subject: cron\n\nhi\n")
            .status
            .success());
    }
    // 4 + 2 over SMTP and the 2 of sendmail to alice, and bob's report of bad.test's refusal.
    let mut samples = Vec::new();
    wait_for(
        "the counts of every delivery",
        Duration::from_secs(60),
        || {
            samples = scrape(port);
            value(
                &samples,
                "qms_deliveries_total",
                &[("queue", "local"), ("status", "sent")],
            ) == 7.0
                && value(
                    &samples,
                    "qms_deliveries_total",
                    &[("queue", "smtp"), ("status", "sent")],
                ) == 2.0
                && value(
                    &samples,
                    "qms_deliveries_total",
                    &[("queue", "smtp"), ("status", "bounced")],
                ) == 1.0
                && value(
                    &samples,
                    "qms_deliveries_total",
                    &[("queue", "pipe"), ("status", "deferred")],
                ) >= 1.0
                && value(&samples, "qms_auth_failures_total", &[]) == 2.0
        },
    );
    let v = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);
    assert_eq!(
        v("qms_messages_received_total", &[("protocol", "smtp")]),
        8.0
    );
    assert_eq!(
        v("qms_messages_received_total", &[("protocol", "sendmail")]),
        2.0
    );
    // 11 sessions, and the harness's own check that the port listens.
    let sessions = v("qms_connections_total", &[("service", "smtp")]);
    assert!((11.0..=12.0).contains(&sessions), "{sessions}");
    assert_eq!(v("qms_tls_sessions_total", &[("service", "smtp")]), 1.0);
    assert_eq!(v("qms_auth_failures_total", &[("service", "smtp")]), 2.0);
    assert_eq!(v("qms_rejects_total", &[("stage", "rcpt")]), 1.0);
    assert_eq!(
        v(
            "qms_destination_deliveries_total",
            &[("domain", "example.test"), ("status", "sent")]
        ),
        7.0
    );
    assert_eq!(
        v(
            "qms_destination_deliveries_total",
            &[("domain", "ok.test"), ("status", "sent")]
        ),
        2.0
    );
    assert_eq!(
        v(
            "qms_destination_deliveries_total",
            &[("domain", "bad.test"), ("status", "bounced")]
        ),
        1.0
    );
    // The delay histogram: one observation per delivery, buckets that only grow.
    assert_eq!(
        v("qms_delivery_delay_seconds_count", &[("queue", "local")]),
        7.0
    );
    assert_eq!(
        v(
            "qms_delivery_delay_seconds_bucket",
            &[("queue", "local"), ("le", "+Inf")]
        ),
        7.0
    );
    assert!(v("qms_delivery_delay_seconds_sum", &[("queue", "local")]) > 0.0);
    let mut buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|(n, l, _)| n == "qms_delivery_delay_seconds_bucket" && l["queue"] == "local")
        .map(|(_, l, v)| (l["le"].parse::<f64>().unwrap_or(f64::INFINITY), *v))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
    // The queue as it stands: slow.test's message waits in the pipe queue, new.
    assert_eq!(
        v(
            "qms_queue_messages",
            &[("queue", "pipe"), ("state", "waiting"), ("age", "5m")]
        ),
        1.0
    );
    assert_eq!(v("qms_queue_messages", &[("queue", "smtp")]), 0.0);
    // Workers by queue, as configured (the routers serve incoming).
    assert_eq!(v("qms_workers", &[("queue", "smtp")]), 2.0);
    assert_eq!(v("qms_workers", &[("queue", "incoming")]), 1.0);
    assert!(v("qms_tracker_events_total", &[]) > 0.0);
    assert!(samples
        .iter()
        .any(|(n, _, _)| n == "qms_tracker_lag_seconds"));
    assert!(get(port, "/other").starts_with("HTTP/1.1 404"));
}
