//! SRS (issue #15): mail an alias forwards to another domain leaves with an SRS0 envelope
//! sender of ours; a bounce to it goes back to the original sender; a forged one is refused
//! at RCPT, so the rewritten addresses are no open relay.

mod common;
use common::*;
use std::time::Duration;

/// The reply code to RCPT TO:<to> from a stranger, after MAIL FROM:<>.
fn rcpt_code(port: u16, to: &str) -> u16 {
    let script = r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30)
s.ehlo("client.test")
s.mail("")
print(s.rcpt(sys.argv[2])[0])
s.quit()
"#;
    let (ok, out) = python(script, &[port.to_string(), to.to_string()]);
    assert!(ok, "{out}");
    out.trim().parse().unwrap()
}

fn mail_from(m: &str) -> &str {
    m.lines()
        .find_map(|l| l.strip_prefix("X-Mail-Args: <"))
        .and_then(|l| l.split('>').next())
        .unwrap_or("")
}

#[test]
fn forwarded_mail_gets_an_srs_sender_and_its_bounce_finds_the_way_back() {
    let port = free_port();
    let mut inst = relay_instance(
        &[("sink.test", port), ("remote.test", port)],
        "[srs]\ndomain = \"example.test\"\nsecret_file = \"srs.secret\"\n",
    );
    std::fs::write(inst.dir.join("srs.secret"), "a secret for the tests only\n").unwrap();
    std::fs::write(
        inst.dir.join("aliases"),
        "postmaster: alice\nfwd: x@sink.test\n",
    )
    .unwrap();
    inst.own();
    let sink = Sink::start(&inst, "srs", "127.0.0.1", port, &[]);
    inst.start();
    // A stranger's mail to the alias, and our own user's: only the stranger's is rewritten.
    smtp_send(
        inst.smtp_port,
        "ann@remote.test",
        &["fwd@example.test"],
        "Subject: forwarded\r\n\r\nhi\r\n",
        "",
    );
    wait_for("the forwarded message", Duration::from_secs(30), || {
        sink.messages().len() == 1
    });
    let fwd = sink.messages().remove(0);
    let srs = mail_from(&fwd).to_string();
    assert!(
        srs.starts_with("SRS0=") && srs.ends_with("=remote.test=ann@example.test"),
        "{fwd}"
    );
    smtp_send(
        inst.smtp_port,
        "bob@example.test",
        &["fwd@example.test"],
        "Subject: ours\r\n\r\nhi\r\n",
        "",
    );
    wait_for(
        "our user's forwarded message",
        Duration::from_secs(30),
        || sink.messages().len() == 2,
    );
    let ours = sink
        .messages()
        .into_iter()
        .find(|m| m.contains("Subject: ours"))
        .unwrap();
    assert_eq!(mail_from(&ours), "bob@example.test");

    // The next hop bounces: the report to the SRS address reaches the original sender.
    assert_eq!(rcpt_code(inst.smtp_port, &srs), 250);
    smtp_send(
        inst.smtp_port,
        "",
        &[&srs],
        "Subject: bounce\r\n\r\nundeliverable\r\n",
        "",
    );
    wait_for(
        "the bounce back at remote.test",
        Duration::from_secs(30),
        || {
            sink.messages().iter().any(|m| {
                m.contains("Subject: bounce") && m.contains("X-Rcpt-Args: <ann@remote.test>")
            })
        },
    );
    // A forged one (another sender under our signature, or no signature) is refused: the
    // SRS addresses relay nothing else.
    let forged = srs.replace("=remote.test=ann@", "=victim.test=ann@");
    assert_eq!(rcpt_code(inst.smtp_port, &forged), 550);
    assert_eq!(
        rcpt_code(inst.smtp_port, "SRS0=abcdef=aa=victim.test=x@example.test"),
        550
    );
}
