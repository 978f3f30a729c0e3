//! Tracking: no event is lost or counted twice when the tracker or a writer is killed, and
//! a message is found by its Message-ID.

mod common;
use common::*;
use std::time::Duration;

fn count(inst: &Instance, state: &str) -> usize {
    let out = inst.qms(&["track", "--state", state, "--json"]);
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn events_survive_killed_tracker_and_writer_exactly_once() {
    let mut inst = Instance::new("", "");
    inst.start();
    let n = 60;
    for i in 0..n {
        let msg = format!("Message-ID: <m{i}@client.test>\r\nSubject: t{i}\r\n\r\nbody {i}\r\n");
        smtp_send(
            inst.smtp_port,
            "a@remote.test",
            &["alice@example.test"],
            &msg,
            "",
        );
        if i % 10 == 5 {
            kill_role(&inst, "tracker");
        }
        if i == 30 {
            // The writer of the `received` events dies too; the supervisor starts another.
            assert!(kill_role(&inst, "smtpd") > 0);
            let port = inst.smtp_port;
            wait_for("smtpd back", Duration::from_secs(30), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
        }
    }
    wait_for("every delivery", Duration::from_secs(60), || {
        inst.count_new("alice") == n
    });
    wait_for("every delivery event", Duration::from_secs(60), || {
        count(&inst, "delivered") >= n
    });
    wait_for("every received event", Duration::from_secs(60), || {
        count(&inst, "received") >= n
    });
    // Let the tracker finish what is on disk, then check nothing was counted twice.
    wait_for(
        "the dead writers' files to be read and removed",
        Duration::from_secs(30),
        || {
            inst.files("track").iter().all(|f| {
                let pid = f.split('.').nth(1).unwrap_or("");
                std::path::Path::new(&format!("/proc/{pid}")).exists()
            })
        },
    );
    assert_eq!(count(&inst, "received"), n);
    assert_eq!(count(&inst, "routed"), n);
    assert_eq!(count(&inst, "delivered"), n);

    // Found by Message-ID, with or without angle brackets.
    for id in ["<m7@client.test>", "m7@client.test"] {
        let out = inst.qms(&["track", id]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && text.contains("alice@example.test")
                && text.contains("delivered"),
            "{text}"
        );
        assert_eq!(text.matches("received").count(), 1, "{text}");
    }
}

/// Issue #14.5: a message's events in the order they happened: received before routed,
/// routed before delivered, for mail over SMTP and from sendmail alike.
#[test]
fn events_come_in_causal_order() {
    let mut inst = Instance::new("", "");
    inst.start();
    let n = 60;
    std::thread::scope(|s| {
        for t in 0..3 {
            let inst = &inst;
            s.spawn(move || {
                let mut c = SmtpClient::connect(inst.smtp_port).unwrap();
                for i in (t..n / 2).step_by(3) {
                    c.send(
                        "a@client.test",
                        "alice@example.test",
                        &format!("Subject: s{i}\r\n\r\nx\r\n"),
                    )
                    .unwrap();
                }
            });
        }
        let inst = &inst;
        s.spawn(move || {
            send_many(inst, n / 2, 2, |i| {
                (
                    "bob".to_string(),
                    format!("Subject: m{i}\n\nx\n").into_bytes(),
                )
            })
        });
    });
    wait_for("every delivery tracked", Duration::from_secs(60), || {
        count(&inst, "delivered") == n
    });
    let out = inst.qms(&["track", "--json"]);
    let mut seen: std::collections::HashMap<(String, String), Vec<String>> = Default::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = (
            v["qid"].as_str().unwrap_or("").to_string(),
            v["recipient"].as_str().unwrap_or("").to_string(),
        );
        seen.entry(key)
            .or_default()
            .push(v["event"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(seen.len(), n);
    for (k, events) in &seen {
        assert_eq!(
            events.iter().map(String::as_str).collect::<Vec<_>>(),
            ["received", "routed", "delivered"],
            "{k:?}"
        );
    }
}

/// Issue #14: `[tracking] keep` bounds the database; the tracker prunes older events.
#[test]
fn old_events_are_pruned() {
    let mut inst = Instance::new("", "[tracking]\nkeep = \"1s\"\n");
    inst.start();
    smtp_send(
        inst.smtp_port,
        "a@remote.test",
        &["alice@example.test"],
        "Subject: p\r\n\r\nx\r\n",
        "",
    );
    wait_for("the delivery tracked", Duration::from_secs(30), || {
        count(&inst, "delivered") == 1
    });
    let first = std::time::Instant::now();
    wait_for(
        "the events to be older than keep",
        Duration::from_secs(10),
        || first.elapsed() > Duration::from_secs(2),
    );
    // A tracker prunes when it starts, then hourly.
    kill_role(&inst, "tracker");
    wait_for("the events pruned", Duration::from_secs(30), || {
        inst.log().contains("status=pruned events=")
    });
    assert_eq!(count(&inst, "delivered"), 0);
    assert!(!inst.qms(&["track"]).status.success(), "no events left");
}
