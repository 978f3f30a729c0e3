//! Tracked sending (X822-MSP headers) end to end: the router's handling of BX-/X-B- fields,
//! plugins, dry runs, reports fetched over IMAP, and the DSN processor's loop (per-message
//! smarthosts are in smarthost.rs).

mod common;
use common::*;
use std::time::Duration;

const TRACKED: &str = "X-B-Envelope-Addr: bounces@example.test\n\
BX-Delivery-Notification-Req-To: reports@example.test\n\
BX-Delivery-Notification-Req-For: x@sink.test\n\
BX-Non-Delivery-Notification-Req-To: bounces@example.test\n\
BX-Disposition-Notification-Req-To: reader@example.test\n\
X-B-CrossRef: offer-42\n\
X-B-Non-Delivery-Notification-Actions: notify-co-recipients\n\
BX-Sending-Method: inject\n\
BX-Frobnicate: yes\n\
Subject: tracked offer\n\
\n\
Dear candidate\n";

#[test]
fn tracked_sending_headers_from_a_trusted_submitter() {
    let port = free_port();
    let mut inst = relay_instance(&[("sink.test", port)], "");
    let sink = Sink::start(&inst, "msp", "127.0.0.1", port, &[]);
    inst.start();
    let out = inst.sendmail(&["x@sink.test", "y@sink.test"], TRACKED.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the message at the sink", Duration::from_secs(30), || {
        sink.messages().len() == 1
    });
    let m = &sink.messages()[0];
    let head = m.split("\n\n").next().unwrap();
    assert!(
        !head.to_ascii_lowercase().contains("\nbx-"),
        "BX- fields left qms: {m}"
    );
    assert!(
        head.contains("X-B-CrossRef: offer-42")
            && head.contains("X-B-Non-Delivery-Notification-Actions"),
        "{m}"
    );
    assert!(
        head.contains("Disposition-Notification-To: <reader@example.test>")
            && head.contains("Return-Receipt-To: <reader@example.test>"),
        "{m}"
    );
    assert!(
        m.contains("X-Mail-Args: <bounces@example.test>")
            && m.contains("RET=HDRS")
            && m.contains("ENVID=offer-42"),
        "{m}"
    );
    let rcpt_args: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("X-Rcpt-Args:"))
        .collect();
    assert!(
        rcpt_args
            .iter()
            .any(|l| l.contains("<x@sink.test>") && l.contains("SUCCESS") && l.contains("FAILURE")),
        "{rcpt_args:?}"
    );
    assert!(
        rcpt_args.iter().any(|l| l.contains("<y@sink.test>")
            && !l.contains("SUCCESS")
            && l.contains("FAILURE,DELAY")),
        "{rcpt_args:?}"
    );
    let log = inst.log();
    assert!(
        log.contains("status=msp-ignored") && log.contains("BX-Frobnicate"),
        "{log}"
    );
}

#[test]
fn tracked_sending_headers_from_anyone_else_are_removed() {
    let port = free_port();
    let mut inst = relay_instance(&[("sink.test", port)], "");
    let sink = Sink::start(&inst, "untrusted", "127.0.0.1", port, &[]);
    inst.start();
    // Plain SMTP from a client outside mynetworks, to a relay domain.
    smtp_send(
        inst.smtp_port,
        "stranger@remote.test",
        &["x@sink.test"],
        &TRACKED.replace('\n', "\r\n"),
        "",
    );
    wait_for("the message at the sink", Duration::from_secs(30), || {
        sink.messages().len() == 1
    });
    let m = &sink.messages()[0];
    let head = m.split("\n\n").next().unwrap().to_ascii_lowercase();
    assert!(
        !head.contains("\nbx-")
            && !head.contains("\nx-b-")
            && !head.contains("disposition-notification-to"),
        "{m}"
    );
    assert!(
        m.contains("X-Mail-Args: <stranger@remote.test>"),
        "the envelope must not change: {m}"
    );
    assert!(inst.log().contains("status=msp-removed"));
}

#[test]
fn dryrun_routes_and_tracks_but_sends_nothing() {
    let port = free_port();
    let mut inst = relay_instance(&[("sink.test", port)], "");
    let sink = Sink::start(&inst, "dry", "127.0.0.1", port, &[]);
    inst.start();
    let msg =
        "BX-Sending-Run-Control: dryrun\nX-B-CrossRef: dry-1\nSubject: dry\n\nnot for sending\n";
    assert!(inst
        .sendmail(&["x@sink.test"], msg.as_bytes())
        .status
        .success());
    wait_for("the dry run in the log", Duration::from_secs(30), || {
        inst.log().contains("status=dryrun")
    });
    wait_for("the queue to empty", Duration::from_secs(30), || {
        inst.queue_json().is_empty()
    });
    wait_for("the dryrun event", Duration::from_secs(30), || {
        String::from_utf8_lossy(&inst.qms(&["track", "--state", "dryrun"]).stdout)
            .contains("x@sink.test")
    });
    assert!(sink.messages().is_empty(), "a dry run sent mail");
}

#[test]
fn full_loop_bounce_tracked_and_co_recipient_told_once() {
    let (inst, ok, _bad) = tracked_loop("");
    let msg = "From: app@example.test\nTo: a@ok.test, b@bad.test\nMessage-ID: <offer-77@example.test>\n\
X-B-Envelope-Addr: bounces@example.test\nBX-Non-Delivery-Notification-Req-To: bounces@example.test\n\
X-B-Non-Delivery-Notification-Actions: notify-co-recipients\nX-B-CrossRef: offer-77\nSubject: Your offer\n\nWelcome aboard.\n";
    assert!(inst.sendmail(&["-t"], msg.as_bytes()).status.success());
    // The bounce reaches the envelope mailbox and dsnproc reads it (moves it to cur/).
    let cur = inst.maildir("bounces").join("cur");
    wait_for(
        "dsnproc to read the bounce",
        Duration::from_secs(60),
        || std::fs::read_dir(&cur).map(|d| d.count()).unwrap_or(0) >= 1,
    );
    // The co-recipient gets one notice, and qms track shows the failure.
    wait_for("the notice at a@ok.test", Duration::from_secs(60), || {
        ok.messages()
            .iter()
            .any(|m| m.contains("Not delivered to b@bad.test"))
    });
    wait_for("the failure in qms track", Duration::from_secs(30), || {
        let out = String::from_utf8_lossy(&inst.qms(&["track", "offer-77@example.test"]).stdout)
            .into_owned();
        out.contains("b@bad.test")
            && out.contains("co-recipient-notified")
            && out.contains("dsnproc")
    });
    wait_for("the queue to empty", Duration::from_secs(30), || {
        inst.queue_json().is_empty()
    });
    let msgs = ok.messages();
    assert_eq!(
        msgs.iter()
            .filter(|m| m.contains("Not delivered to b@bad.test"))
            .count(),
        1,
        "{msgs:?}"
    );
    assert_eq!(
        msgs.iter().filter(|m| m.contains("Welcome aboard")).count(),
        1
    );
    let notice = msgs.iter().find(|m| m.contains("Not delivered")).unwrap();
    assert!(
        notice.contains("X-Rcpt-Args: <a@ok.test>")
            && !notice.contains("X-Rcpt-Args: <b@bad.test>"),
        "{notice}"
    );
    let events =
        String::from_utf8_lossy(&inst.qms(&["track", "offer-77", "--json"]).stdout).into_owned();
    assert!(
        events.lines().any(|l| l.contains("\"b@bad.test\"")
            && l.contains("\"failed\"")
            && l.contains("dsnproc")),
        "found by crossref: {events}"
    );
}

#[test]
fn verp_envelopes_are_signed_and_forgeries_not_believed() {
    let (ok_port, bad_port) = (free_port(), free_port());
    let mut inst = relay_instance(
        &[("ok.test", ok_port), ("bad.test", bad_port)],
        "[tracking]\nenvelope_maildir = \"mail/envelope\"\nenvelope = \"envelope@example.test\"\nkey = \"a-test-key-of-enough-length\"\n",
    );
    inst.edit_config(
        "[mailboxes]\n",
        "[mailboxes]\n\"envelope@example.test\" = { maildir = \"mail/envelope\" }\n",
    );
    let ok = Sink::start(&inst, "ok", "127.0.0.1", ok_port, &[]);
    let _bad = Sink::start(&inst, "bad", "127.0.0.1", bad_port, &["-f", "RCPT"]);
    inst.start();
    let msg = "From: app@example.test\nTo: a@ok.test, b@bad.test\nX-B-CrossRef: v-1\n\
X-B-Non-Delivery-Notification-Actions: notify-co-recipients\nSubject: signed\n\nbody\n";
    assert!(inst.sendmail(&["-t"], msg.as_bytes()).status.success());
    wait_for(
        "the original and the notice at a@ok.test",
        Duration::from_secs(60),
        || ok.messages().len() == 2,
    );
    let original = ok
        .messages()
        .into_iter()
        .find(|m| m.contains("Subject: signed"))
        .unwrap();
    assert!(
        original.contains("X-Mail-Args: <envelope+"),
        "a VERP envelope per recipient: {original}"
    );
    // The real report was believed; a copy with a tampered signature is not.
    let cur = inst.maildir("envelope").join("cur");
    wait_for("the report read", Duration::from_secs(30), || {
        std::fs::read_dir(&cur).map(|d| d.count()).unwrap_or(0) == 1
    });
    let real = std::fs::read_dir(&cur)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(&real).unwrap();
    let to_line = text
        .lines()
        .find(|l| l.starts_with("Delivered-To: envelope+"))
        .unwrap()
        .to_string();
    let forged_line = format!(
        "{}x@example.test",
        to_line
            .split('@')
            .next()
            .unwrap()
            .trim_end_matches(|c: char| c != '-')
    );
    let forged = text.replacen(&to_line, &forged_line, 1);
    let tmp = inst.maildir("envelope").join("tmp/forged");
    std::fs::write(&tmp, forged).unwrap();
    inst.own();
    std::fs::rename(&tmp, inst.maildir("envelope").join("new/forged")).unwrap();
    wait_for("the forgery to be refused", Duration::from_secs(30), || {
        inst.log().contains("status=forged")
    });
    wait_for("the queue to empty", Duration::from_secs(30), || {
        inst.queue_json().is_empty()
    });
    assert_eq!(
        ok.messages().len(),
        2,
        "a forged bounce caused another notice"
    );
    let failed = String::from_utf8_lossy(
        &inst
            .qms(&["track", "v-1", "--state", "failed", "--json"])
            .stdout,
    )
    .lines()
    .filter(|l| l.contains("dsnproc") && l.contains("\"event\":\"failed\""))
    .count();
    assert_eq!(failed, 1, "only the real report is recorded");
}

#[test]
fn plugins_from_the_allow_list_and_refused_requests() {
    let port = free_port();
    let mut inst = relay_instance(&[("sink.test", port)], "[msp]\nplugin_dir = \"plugins\"\n");
    inst.edit_config("[smtp]\n", "[smtp]\nmynetworks = [\"127.0.0.0/8\"]\n");
    let plugins = inst.dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let out = inst.dir.join("post.out");
    for (name, body) in [
        ("stamp", "printf 'X-Stamped: %s\\n' \"$QMS_CROSSREF\"\nexec cat".to_string()),
        ("refuse", "cat > /dev/null\necho 'no offers on Sundays' >&2\nexit 1".to_string()),
        (
            "notify",
            format!(
                "{{ echo \"result=$QMS_RESULT attempt=$QMS_ATTEMPT crossref=$QMS_CROSSREF\"; printf '%s' \"$QMS_RESULTS\"; cat; }} >> {}",
                out.display()
            ),
        ),
    ] {
        let p = plugins.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(plugins.join("not-executable"), "#!/bin/sh\n").unwrap();
    inst.own();
    let sink = Sink::start(&inst, "plugins", "127.0.0.1", port, &[]);
    inst.start();
    let send = |fields: &str, subject: &str| {
        let m = format!(
            "X-B-Envelope-Addr: alice@example.test\nX-B-CrossRef: {subject}\n{fields}Subject: {subject}\n\nbody\n"
        );
        assert!(inst
            .sendmail(&["x@sink.test"], m.as_bytes())
            .status
            .success());
    };
    send(
        "BX-MTA-Submission-Pre-Plugins: stamp\nBX-MTA-Submission-Post-Plugins: notify\n",
        "p-1",
    );
    send("BX-MTA-Submission-Pre-Plugins: stamp, refuse\n", "p-2");
    send("BX-MTA-Submission-Pre-Plugins: ../../../bin/true\n", "p-3");
    send("BX-MTA-Submission-Post-Plugins: not-executable\n", "p-4");
    send("BX-Sending-Method: submit\n", "p-6");
    // Injection uses qms's own routes, whatever smarthost the message names.
    send(
        "BX-Sending-Method: inject\nBX-MTA-Rem-Host: 192.0.2.1\n",
        "p-7",
    );
    // Trusted (mynetworks) but not on the smarthost list.
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["x@sink.test"],
        "BX-MTA-Rem-Host: 127.0.0.1\r\nBX-MTA-Rem-User: app\r\nBX-MTA-Rem-Passwd: hunter2-secret\r\nSubject: p-5\r\n\r\nbody\r\n",
        "",
    );
    wait_for("two messages at the sink", Duration::from_secs(30), || {
        sink.messages().len() == 2
    });
    let sent = sink.messages();
    assert!(sent.iter().any(|m| m.contains("Subject: p-7")), "{sent:#?}");
    let m = sent.iter().find(|m| m.contains("Subject: p-1")).unwrap();
    assert!(
        m.contains("X-Stamped: p-1") && m.contains("Subject: p-1"),
        "{m}"
    );
    wait_for("the post-plugin's report", Duration::from_secs(30), || {
        std::fs::read_to_string(&out).is_ok_and(|s| s.contains("\"recipient\""))
    });
    let report = std::fs::read_to_string(&out).unwrap();
    assert!(
        report.contains("result=delivered attempt=1 crossref=p-1")
            && report.contains("x@sink.test delivered")
            && report.contains("\"state\":\"delivered\""),
        "{report}"
    );
    wait_for(
        "five error reports to alice",
        Duration::from_secs(30),
        || inst.count_new("alice") == 5,
    );
    let bounces = inst.read_maildir("alice");
    for (subject, why) in [
        ("p-2", "no offers on Sundays"),
        ("p-3", "not a plain file name"),
        ("p-4", "not an executable file"),
        ("p-5", "may not choose a smarthost"),
        ("p-6", "submit needs BX-MTA-Rem-Host"),
    ] {
        assert!(
            bounces
                .iter()
                .any(|b| b.contains(&format!("Subject: {subject}")) && b.contains(why)),
            "no bounce for {subject} saying {why:?}: {bounces:#?}"
        );
    }
    assert_eq!(sink.messages().len(), 2, "a refused message was sent");
    let log = inst.log();
    assert!(
        !log.contains("hunter2-secret") && !bounces.iter().any(|b| b.contains("hunter2-secret")),
        "a credential leaked"
    );
}

const IMAP_PASSWORD: &str = "imap-pw-Xy7";

/// The IMAP tests' world: a provider's Dovecot holding the reports mailbox, an instance that
/// polls it every second, and one tracked message (`imap-1`) relayed to a sink. The
/// provider's instance is returned only to be kept until the end.
fn imap_reports() -> (Instance, Dovecot, Sink, Instance) {
    let port = free_port();
    // The provider's side lives apart: the instance's directory is handed to its user.
    let provider = Instance::new("", "");
    let dovecot = Dovecot::start(&provider.dir, "reports", IMAP_PASSWORD);
    let mut inst = relay_instance(
        &[("ok.test", port)],
        &format!(
            "[tracking]\nenvelope_maildir = \"mail/envelope\"\n[tracking.imap]\nserver = \"127.0.0.1:{}\"\n\
user = \"reports\"\npassword_file = \"imap.pass\"\nca_file = \"{}\"\ninterval = 1\n",
            dovecot.port,
            dovecot.ca.display()
        ),
    );
    std::fs::write(inst.dir.join("imap.pass"), format!("{IMAP_PASSWORD}\n")).unwrap();
    inst.own();
    let sink = Sink::start(&inst, "ok", "127.0.0.1", port, &[]);
    inst.start();
    let msg = "From: app@example.test\nTo: a@ok.test\nMessage-ID: <imap-1@example.test>\n\
X-B-Envelope-Addr: bounces@provider.test\nX-B-CrossRef: imap-1\nSubject: fetched report\n\nhello\n";
    assert!(inst.sendmail(&["-t"], msg.as_bytes()).status.success());
    wait_for("the message at the sink", Duration::from_secs(30), || {
        sink.messages().len() == 1
    });
    wait_for("the message tracked", Duration::from_secs(30), || {
        String::from_utf8_lossy(&inst.qms(&["track", "imap-1"]).stdout).contains("relayed")
    });
    (inst, dovecot, sink, provider)
}

#[test]
fn reports_fetched_from_a_remote_imap_mailbox() {
    let (inst, dovecot, _sink, _provider) = imap_reports();
    // The next hop accepted it, then bounced it to the provider's mailbox.
    dovecot.deliver(
        "1.report",
        "From: MAILER-DAEMON@mx.ok.test\nTo: bounces@provider.test\nSubject: Undelivered Mail\n\
MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\n\n\
--B\nContent-Type: text/plain\n\nNot delivered.\n\n--B\nContent-Type: message/delivery-status\n\n\
Reporting-MTA: dns; mx.ok.test\nOriginal-Envelope-Id: imap-1\n\nFinal-Recipient: rfc822; a@ok.test\n\
Action: failed\nStatus: 5.2.1\nDiagnostic-Code: smtp; 550 5.2.1 mailbox disabled\n\n\
--B\nContent-Type: text/rfc822-headers\n\nMessage-ID: <imap-1@example.test>\nSubject: fetched report\n\n--B--\n",
    );
    wait_for(
        "the failure recorded from the fetched report",
        Duration::from_secs(60),
        || {
            let out = String::from_utf8_lossy(&inst.qms(&["track", "imap-1", "--json"]).stdout)
                .into_owned();
            out.lines()
                .any(|l| l.contains("\"failed\"") && l.contains("dsnproc") && l.contains("5.2.1"))
        },
    );
    // A temporary failure reported as final is noted, not taken for a bounce.
    dovecot.deliver(
        "0.soft",
        "From: MAILER-DAEMON@mx.ok.test\nTo: bounces@provider.test\nSubject: Undelivered Mail\n\
MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\n\n\
--B\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.ok.test\nOriginal-Envelope-Id: imap-1\n\n\
Final-Recipient: rfc822; a@ok.test\nAction: failed\nStatus: 4.2.2\nDiagnostic-Code: smtp; 452 4.2.2 mailbox full\n\n--B--\n",
    );
    wait_for("the soft failure recorded", Duration::from_secs(60), || {
        String::from_utf8_lossy(&inst.qms(&["track", "imap-1", "--json"]).stdout)
            .lines()
            .any(|l| l.contains("\"soft-failed\"") && l.contains("4.2.2"))
    });
    // A read receipt that names the message only in In-Reply-To:.
    dovecot.deliver(
        "2.mdn",
        "From: a@ok.test\nTo: bounces@provider.test\nSubject: Read: fetched report\n\
In-Reply-To: <imap-1@example.test>\nMIME-Version: 1.0\n\
Content-Type: multipart/report; report-type=disposition-notification; boundary=\"M\"\n\n\
--M\nContent-Type: message/disposition-notification\n\nReporting-UA: ua.ok.test; Mailer\n\
Final-Recipient: rfc822;a@ok.test\nDisposition: manual-action/MDN-sent-manually; displayed\n\n--M--\n",
    );
    wait_for("the receipt recorded", Duration::from_secs(60), || {
        String::from_utf8_lossy(&inst.qms(&["track", "imap-1", "--json"]).stdout)
            .lines()
            .any(|l| l.contains("\"displayed\"") && l.contains("dsnproc"))
    });
    // Seen on the server, kept in the local envelope Maildir as read.
    wait_for(
        "every report flagged \\Seen on the server",
        Duration::from_secs(30),
        || {
            std::fs::read_dir(dovecot.maildir.join("cur")).is_ok_and(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().contains(":2,S"))
                    .count()
                    == 3
            })
        },
    );
    let local: Vec<String> = std::fs::read_dir(inst.maildir("envelope").join("cur"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(local.len(), 3, "{local:?}");
    assert!(local.iter().all(|l| l.starts_with("imap.")), "{local:?}");
    // Another poll finds nothing new: the report is not recorded twice.
    wait_for("two more polls", Duration::from_secs(30), || {
        dovecot.log().matches("Login: user=<reports>").count() >= 3
    });
    let failed = String::from_utf8_lossy(
        &inst
            .qms(&["track", "imap-1", "--state", "failed", "--json"])
            .stdout,
    )
    .lines()
    .filter(|l| l.contains("dsnproc"))
    .count();
    assert_eq!(failed, 1);
    assert!(
        !inst.log().contains(IMAP_PASSWORD),
        "the IMAP password was logged"
    );
}

/// Hostile mail sent to the reports address: dsnproc fetched every message of the provider's
/// mailbox whole, fifty at a time, so fifty large messages took gigabytes of its memory.
/// Now it fetches at most 256 KiB of each; a report comes first in its message and is read
/// all the same.
#[test]
fn a_huge_message_in_the_imap_mailbox_is_fetched_cut_and_its_report_still_read() {
    let (inst, dovecot, _sink, _provider) = imap_reports();
    let line = format!("{}\n", "x".repeat(76));
    dovecot.deliver(
        "1.huge",
        &format!(
            "From: MAILER-DAEMON@mx.ok.test\nTo: bounces@provider.test\nSubject: Undelivered Mail\n\
MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\n\n\
--B\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.ok.test\n\
Original-Envelope-Id: imap-1\n\nFinal-Recipient: rfc822; a@ok.test\nAction: failed\n\
Status: 5.2.2\nDiagnostic-Code: smtp; 552 5.2.2 over quota\n\n\
--B\nContent-Type: message/rfc822\n\nMessage-ID: <imap-1@example.test>\n\
Subject: fetched report\n\n{}\n--B--\n",
            line.repeat(8 << 20 >> 7)
        ),
    );
    wait_for(
        "the failure recorded from the cut report",
        Duration::from_secs(60),
        || {
            String::from_utf8_lossy(&inst.qms(&["track", "imap-1", "--json"]).stdout)
                .lines()
                .any(|l| l.contains("\"failed\"") && l.contains("dsnproc") && l.contains("5.2.2"))
        },
    );
    let kept: Vec<u64> = std::fs::read_dir(inst.maildir("envelope").join("cur"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0] <= 256 << 10, "fetched whole: {kept:?} bytes");
    assert!(
        inst.log().contains("cut at 262144 bytes"),
        "the cut is logged: {}",
        inst.log()
    );
}
