//! LMTP delivery (issue #17): a route `lmtp:[host]:port` hands mail to a real Dovecot's LMTP
//! service, which answers for each recipient after the data (RFC 2033); each recipient is
//! settled on its own, and what Dovecot took is read back over IMAP.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn dovecot_takes_one_recipient_and_refuses_the_other_each_settled_on_its_own() {
    takes_one_refuses_the_other(|d| {
        (
            format!("lmtp:[127.0.0.1]:{}", d.lmtp_port),
            format!("relay=127.0.0.1[127.0.0.1]:{}", d.lmtp_port),
        )
    });
}

/// The same over Dovecot's local socket (`lmtp:unix:PATH`, as Debian's Dovecot listens).
#[test]
fn over_the_local_socket_too() {
    takes_one_refuses_the_other(|d| {
        let path = d.lmtp_socket.display();
        (
            format!("lmtp:unix:{path}"),
            format!("relay=localhost[{path}]"),
        )
    });
}

/// `route` gives the route to Dovecot and how the delivery line names the relay.
fn takes_one_refuses_the_other(route: impl Fn(&Dovecot) -> (String, String)) {
    let mut inst = Instance::new("", "");
    let dovecot = Dovecot::start(&inst.dir, "carol", "imap password");
    let (route, relay) = route(&dovecot);
    inst.edit_config(
        "local = [\"example.test\"]",
        "local = [\"example.test\"]\nrelay = [\"post.test\"]",
    );
    inst.edit_config(
        "[scheduler]",
        &format!(
            "[routes]\n\"post.test\" = \"{}@lmtp\"\n[queues.lmtp]\nworkers = 1\n[scheduler]",
            route
        ),
    );
    // Not `inst.own()` now: Dovecot's directory keeps the owners Dovecot needs.
    inst.start();
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["carol@post.test", "nobody@post.test"],
        "Subject: to the post office\r\n\r\nover LMTP\r\n",
        "",
    );
    wait_for(
        "carol's copy and alice's bounce",
        Duration::from_secs(60),
        || {
            inst.read_maildir("alice")
                .iter()
                .any(|m| m.contains("nobody@post.test"))
                && inst.queue_json().is_empty()
        },
    );
    let log = inst.log();
    let line = |to: &str| {
        log.lines()
            .find(|l| l.contains(&format!("to={to} ")) && l.contains("relay="))
            .unwrap_or_else(|| panic!("no delivery line for {to}: {log}"))
            .to_string()
    };
    assert!(line("carol@post.test").contains("status=sent"), "{log}");
    assert!(line("carol@post.test").contains(&relay), "{relay}: {log}");
    assert!(line("nobody@post.test").contains("status=bounced"), "{log}");
    assert!(line("nobody@post.test").contains("5.1.1"), "{log}");
    // Read back as a mail client would, over IMAP.
    let script = r#"
import imaplib, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
m = imaplib.IMAP4_SSL("127.0.0.1", int(sys.argv[1]), ssl_context=ctx)
m.login("carol", "imap password")
m.select("INBOX")
typ, data = m.search(None, "ALL")
ids = data[0].split()
print(len(ids))
for i in ids:
    typ, msg = m.fetch(i, "(RFC822)")
    print(msg[0][1].decode(errors="replace"))
m.logout()
"#;
    let (ok, out) = python(
        script,
        &[dovecot.port.to_string(), dovecot.ca.display().to_string()],
    );
    assert!(ok, "{out}\n{}", dovecot.log());
    assert!(out.starts_with("1\n"), "one message for carol: {out}");
    assert!(out.contains("Subject: to the post office"), "{out}");
    // Dovecot adds its own Return-Path and Delivered-To; qms adds neither over LMTP.
    assert_eq!(out.matches("Return-Path:").count(), 1, "{out}");
    assert_eq!(out.matches("Delivered-To:").count(), 1, "{out}");
}
