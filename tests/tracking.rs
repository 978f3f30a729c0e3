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
