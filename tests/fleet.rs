//! Issue #18, a fleet: qms nodes that share one PostgreSQL tracking database (a private
//! cluster started by the test). A report that comes back to one node is matched to the
//! message another node sent; `qms track` answers for every node; a node keeps taking and
//! delivering mail while the database is down, and its events arrive once it is back.

mod common;
use common::*;
use std::time::Duration;

/// A node named `name` relaying `routes`, tracking into `pg`, with the VERP key every node
/// shares.
fn node(name: &str, pg: &Postgres, routes: &[(&str, u16)], tracking: &str) -> Instance {
    let inst = relay_instance(
        routes,
        &format!(
            "[tracking]\ndatabase = \"{}\"\nkey = \"one key for the fleet\"\n{tracking}",
            pg.url
        ),
    );
    inst.edit_config(
        "spool = \"spool\"",
        &format!("spool = \"spool\"\nnode = \"{name}\""),
    );
    inst
}

fn pg_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("qms-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The cluster's owner (nobody, as root) must reach its directory whatever the umask.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    dir
}

/// Node A sends a tracked message to two recipients, one refused downstream; the bounce
/// goes to the envelope mailbox on node B, whose dsnproc records the failure against A's
/// message in the shared database and tells the co-recipient once; `qms track` on either
/// node shows both recipients' fates with the node that handled each.
#[test]
fn a_bounce_at_one_node_is_matched_to_the_message_another_node_sent() {
    let dir = pg_dir("fleet");
    let pg = Postgres::start(&dir);
    let (ok_port, bad_port) = (free_port(), free_port());
    let mut b = node(
        "node-b",
        &pg,
        &[("ok.test", ok_port), ("bad.test", bad_port)],
        "envelope_maildir = \"mail/bounces\"\n",
    );
    b.edit_config(
        "local = [\"example.test\"]",
        "local = [\"example.test\", \"b.test\"]",
    );
    b.edit_config(
        "[mailboxes]\n",
        "[mailboxes]\n\"bounces@b.test\" = { maildir = \"mail/bounces\" }\n",
    );
    let mut a = node(
        "node-a",
        &pg,
        &[
            ("ok.test", ok_port),
            ("bad.test", bad_port),
            ("b.test", b.smtp_port),
        ],
        "",
    );
    let ok = Sink::start(&a, "ok", "127.0.0.1", ok_port, &[]);
    let _bad = Sink::start(&a, "bad", "127.0.0.1", bad_port, &["-f", "RCPT"]);
    b.start();
    a.start();
    let msg = "From: app@example.test\nTo: a@ok.test, b@bad.test\nMessage-ID: <fleet-1@example.test>\n\
X-B-Envelope-Addr: bounces@b.test\nBX-Non-Delivery-Notification-Req-To: bounces@b.test\n\
X-B-Non-Delivery-Notification-Actions: notify-co-recipients\nX-B-CrossRef: fleet-1\nSubject: Your offer\n\nWelcome aboard.\n";
    assert!(a.sendmail(&["-t"], msg.as_bytes()).status.success());
    let cur = b.maildir("bounces").join("cur");
    wait_showing(
        "node B's dsnproc to read the bounce",
        Duration::from_secs(60),
        &[&a, &b],
        || std::fs::read_dir(&cur).map(|d| d.count()).unwrap_or(0) >= 1,
    );
    wait_showing(
        "the notice at a@ok.test",
        Duration::from_secs(60),
        &[&a, &b],
        || {
            ok.messages()
                .iter()
                .any(|m| m.contains("Not delivered to b@bad.test"))
        },
    );
    for inst in [&a, &b] {
        wait_for("both fates in qms track", Duration::from_secs(30), || {
            let out = String::from_utf8_lossy(&inst.qms(&["track", "fleet-1"]).stdout).into_owned();
            out.lines()
                .any(|l| l.contains("relayed") && l.contains("node=node-a"))
                && out.lines().any(|l| {
                    l.contains(" failed ") && l.contains("by=dsnproc") && l.contains("node=node-b")
                })
                && out.contains("a@ok.test")
                && out.contains("b@bad.test")
        });
    }
    // The failure was recorded against node A's message: the same queue id.
    let b_qid = pg.sql("SELECT qid FROM events WHERE node = 'node-b' AND event = 'failed' AND recipient = 'b@bad.test'");
    let a_qid = pg.sql("SELECT DISTINCT qid FROM events WHERE node = 'node-a' AND recipient = 'b@bad.test' AND event = 'received'");
    assert!(!a_qid.is_empty());
    assert_eq!(b_qid, a_qid);
    // `--node` shows one node's part only.
    let only_b = String::from_utf8_lossy(&a.qms(&["track", "fleet-1", "--node", "node-b"]).stdout)
        .into_owned();
    assert!(
        !only_b.contains("node=node-a") && only_b.contains("node=node-b"),
        "{only_b}"
    );
    // The co-recipient was told once, whichever node might have.
    wait_for("the queues to empty", Duration::from_secs(30), || {
        a.queue_json().is_empty() && b.queue_json().is_empty()
    });
    let notices = ok
        .messages()
        .iter()
        .filter(|m| m.contains("Not delivered to b@bad.test"))
        .count();
    assert_eq!(notices, 1);
    a.stop();
    b.stop();
    drop(pg);
    let _ = std::fs::remove_dir_all(&dir);
}

/// PostgreSQL stopped while mail flows: the node takes and delivers every message, says
/// the tracker is behind and why; once the database is back every event is loaded, none
/// twice.
#[test]
fn a_node_keeps_going_while_the_database_is_down() {
    let dir = pg_dir("fleet-down");
    let pg = Postgres::start(&dir);
    let ok_port = free_port();
    let mut a = node("node-a", &pg, &[("ok.test", ok_port)], "");
    let ok = Sink::start(&a, "ok", "127.0.0.1", ok_port, &[]);
    a.start();
    smtp_send(
        a.smtp_port,
        "app@example.test",
        &["first@ok.test"],
        "Subject: 0\r\n\r\nx\r\n",
        "",
    );
    wait_for(
        "the first event in the database",
        Duration::from_secs(30),
        || pg.sql("SELECT count(*) FROM events WHERE event = 'relayed'") == "1",
    );
    pg.stop();
    for i in 0..20 {
        smtp_send(
            a.smtp_port,
            "app@example.test",
            &[&format!("r{i}@ok.test")],
            &format!("Subject: {i}\r\n\r\nx\r\n"),
            "",
        );
    }
    wait_for("21 messages at the sink", Duration::from_secs(60), || {
        ok.messages().len() == 21
    });
    wait_for(
        "the tracker to say it is behind",
        Duration::from_secs(30),
        || {
            let status = String::from_utf8_lossy(&a.qms(&["status"]).stdout).into_owned();
            status.contains("tracker: behind since") && a.log().contains("status=behind")
        },
    );
    pg.run();
    wait_for("the events to be loaded", Duration::from_secs(60), || {
        pg.sql("SELECT count(*) FROM events WHERE event = 'relayed'") == "21"
    });
    wait_for("the tracker to catch up", Duration::from_secs(30), || {
        a.log().contains("status=caught-up")
    });
    // None twice: every recipient's events once each.
    assert_eq!(
        pg.sql("SELECT count(*) FROM (SELECT recipient, event FROM events GROUP BY recipient, event HAVING count(*) > 1) d"),
        "0"
    );
    assert_eq!(
        pg.sql("SELECT count(DISTINCT recipient) FROM events WHERE event = 'received'"),
        "21"
    );
    a.stop();
    drop(pg);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sslmode=require`: the tracker reaches the database over TLS whose certificate chains to
/// `database_ca_file`; without that file the certificate is refused, nothing is stored, and
/// the tracker says it is behind and why.
#[test]
fn the_database_is_reached_over_verified_tls() {
    let dir = pg_dir("fleet-tls");
    let pg = Postgres::start_tls(&dir);
    let ca = pg.ca.clone().unwrap();
    let ok_port = free_port();
    let tls_pg = |ca_line: &str| {
        format!(
            "[tracking]\ndatabase = \"{}?sslmode=require\"\n{ca_line}",
            pg.url
        )
    };
    let mut a = relay_instance(
        &[("ok.test", ok_port)],
        &tls_pg(&format!("database_ca_file = \"{}\"\n", ca.display())),
    );
    a.edit_config("spool = \"spool\"", "spool = \"spool\"\nnode = \"node-a\"");
    let mut b = relay_instance(&[("ok.test", ok_port)], &tls_pg(""));
    b.edit_config("spool = \"spool\"", "spool = \"spool\"\nnode = \"node-b\"");
    let ok = Sink::start(&a, "ok", "127.0.0.1", ok_port, &[]);
    a.start();
    b.start();
    smtp_send(
        a.smtp_port,
        "app@example.test",
        &["x@ok.test"],
        "Subject: a\r\n\r\nx\r\n",
        "",
    );
    smtp_send(
        b.smtp_port,
        "app@example.test",
        &["y@ok.test"],
        "Subject: b\r\n\r\nx\r\n",
        "",
    );
    wait_for("node A's events over TLS", Duration::from_secs(30), || {
        pg.sql("SELECT count(*) FROM events WHERE node = 'node-a' AND event = 'relayed'") == "1"
    });
    assert_eq!(
        pg.sql("SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name = 'qms'"),
        "t"
    );
    wait_for("both messages at the sink", Duration::from_secs(30), || {
        ok.messages().len() == 2
    });
    wait_for(
        "node B's tracker to say why it is behind",
        Duration::from_secs(30),
        || {
            let log = b.log();
            log.contains("status=behind") && log.to_ascii_lowercase().contains("certificate")
        },
    );
    assert_eq!(
        pg.sql("SELECT count(*) FROM events WHERE node = 'node-b'"),
        "0"
    );
    a.stop();
    b.stop();
    drop(pg);
    let _ = std::fs::remove_dir_all(&dir);
}
