//! Durability you can audit: qms runs under strace, and the trace must show every
//! acknowledgment (a 250 after a message, `sendmail` exiting 0, an incoming job removed once
//! routed, an output job removed once delivered) after a sync covering the files and
//! directory entries written for it. The checker is tests/fixtures/strace_audit.py.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn every_acknowledgment_follows_a_sync_that_covers_it() {
    let port = free_port();
    let mut inst = relay_instance(&[("sink.test", port)], "");
    let sink = Sink::start(&inst, "audit", "127.0.0.1", port, &[]);
    let daemon_trace = inst.dir.join("trace.daemon");
    let wrapper = strace_args(&daemon_trace);
    inst.start_under(&wrapper.iter().map(String::as_str).collect::<Vec<_>>());
    // Over SMTP: one message for a local Maildir (made at its first delivery), one relayed.
    let mut c = SmtpClient::connect(inst.smtp_port).unwrap();
    c.send(
        "a@client.test",
        "alice@example.test",
        "Subject: one\n\nlocal\n",
    )
    .unwrap();
    let mut c = SmtpClient::connect(inst.smtp_port).unwrap();
    c.send(
        "a@client.test",
        "bob@example.test",
        "Subject: two\n\nlocal\n",
    )
    .unwrap();
    // Many at once, so that smtpd's rounds hold several one-file jobs: those are renamed
    // into their queue before the one sync that covers them all.
    let together = 16;
    let start = std::sync::Arc::new(std::sync::Barrier::new(together));
    let senders: Vec<_> = (0..together)
        .map(|i| {
            let (port, start) = (inst.smtp_port, start.clone());
            std::thread::spawn(move || {
                let mut c = SmtpClient::connect(port).unwrap();
                start.wait();
                c.send(
                    "a@client.test",
                    "bob@example.test",
                    &format!("Subject: round {i}\n\nlocal\n"),
                )
                .unwrap();
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    // From a script, with sendmail.
    let sendmail_trace = inst.dir.join("trace.sendmail");
    let strace = strace_args(&sendmail_trace);
    let mut cmd = Command::new(&strace[0]);
    cmd.args(&strace[1..])
        .arg(&inst.bin)
        .arg("-c")
        .arg(&inst.config)
        .args(["sendmail", "x@sink.test"]);
    let out = inst.sendmail_cmd(&mut cmd, &message("three", "relayed"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("everything delivered", Duration::from_secs(60), || {
        inst.count_new("alice") == 1
            && inst.count_new("bob") == 1 + together
            && sink.messages().len() == 1
            && inst.queue_json().is_empty()
    });
    inst.stop_gently();
    let spool = inst.spool();
    let mail = inst.dir.join("mail");
    let roots = [spool.join("msg"), spool.join("queue"), mail];
    let roots: Vec<&std::path::Path> = roots.iter().map(|p| p.as_path()).collect();
    let args = [audit(&daemon_trace, &roots), audit(&sendmail_trace, &roots)];
    let daemon = &args[0];
    for want in [
        "250 queued as",
        "removal of an incoming job",
        "removal of an output job",
    ] {
        assert!(daemon.contains(want), "the trace never showed a {want}");
    }
    let early: usize = daemon
        .lines()
        .find_map(|l| l.strip_suffix(": jobs published before their sync"))
        .and_then(|l| l.strip_prefix("seen "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        early >= 2,
        "no round of smtpd's was published before its sync:\n{daemon}"
    );
    assert!(
        args[1].contains("sendmail exit 0"),
        "sendmail's exit was not seen"
    );
}
