//! Durability you can audit: qms runs under strace, and the trace must show every
//! acknowledgment (a 250 after a message, `sendmail` exiting 0, an incoming job removed once
//! routed, an output job removed once delivered) after a sync covering the files and
//! directory entries written for it. The checker is tests/fixtures/strace_audit.py.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

const SYSCALLS: &str = "trace=openat,open,creat,mkdir,mkdirat,write,pwrite64,writev,pwritev,\
sendto,sendmsg,ftruncate,rename,renameat,renameat2,link,linkat,unlink,unlinkat,fsync,\
fdatasync,syncfs,clone,clone3,fork,vfork,execve,exit_group";

fn strace(out: &std::path::Path) -> Vec<String> {
    ["strace", "-f", "-q", "-yy", "-s", "64", "-e", SYSCALLS, "-o"]
        .iter()
        .map(|s| s.to_string())
        .chain([out.display().to_string()])
        .collect()
}

#[test]
fn every_acknowledgment_follows_a_sync_that_covers_it() {
    let port = free_port();
    let mut inst = relay_instance(&[("sink.test", port)], "");
    let sink = Sink::start(&inst, "audit", "127.0.0.1", port, &[]);
    let daemon_trace = inst.dir.join("trace.daemon");
    let wrapper = strace(&daemon_trace);
    inst.start_under(&wrapper.iter().map(String::as_str).collect::<Vec<_>>());
    // Over SMTP: one message for a local Maildir (made at its first delivery), one relayed.
    let mut c = SmtpClient::connect(inst.smtp_port).unwrap();
    c.send("a@client.test", "alice@example.test", "Subject: one\n\nlocal\n")
        .unwrap();
    let mut c = SmtpClient::connect(inst.smtp_port).unwrap();
    c.send("a@client.test", "bob@example.test", "Subject: two\n\nlocal\n")
        .unwrap();
    // From a script, with sendmail.
    let sendmail_trace = inst.dir.join("trace.sendmail");
    let mut cmd = Command::new("strace");
    cmd.args(strace(&sendmail_trace))
        .arg(&inst.bin)
        .arg("-c")
        .arg(&inst.config)
        .args(["sendmail", "x@sink.test"]);
    let out = inst.sendmail_cmd(&mut cmd, &message("three", "relayed"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("everything delivered", Duration::from_secs(60), || {
        inst.count_new("alice") == 1
            && inst.count_new("bob") == 1
            && sink.messages().len() == 1
            && inst.queue_json().is_empty()
    });
    inst.stop_gently();
    let audit = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/strace_audit.py");
    let spool = inst.spool();
    let mut args = vec![];
    for t in [&daemon_trace, &sendmail_trace] {
        let out = Command::new("python3")
            .arg(audit)
            .arg(t)
            .arg(spool.join("msg"))
            .arg(spool.join("queue"))
            .arg(inst.dir.join("mail"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("{}:\n{text}", t.display());
        assert!(out.status.success(), "the audit of {} failed:\n{text}", t.display());
        args.push(text);
    }
    let daemon = &args[0];
    for want in [
        "250 queued as",
        "removal of an incoming job",
        "removal of an output job",
    ] {
        assert!(daemon.contains(want), "the trace never showed a {want}");
    }
    assert!(args[1].contains("sendmail exit 0"), "sendmail's exit was not seen");
}
