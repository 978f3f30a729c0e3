//! `sendmail` and `mailq` driven the way cron, mail(1) and scripts drive them.

mod common;
use common::*;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

/// A directory with `sendmail` and `mailq` links to the qms binary, as an install makes.
fn links(inst: &Instance) -> std::path::PathBuf {
    let bin = inst.dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in ["sendmail", "mailq", "newaliases"] {
        let _ = std::os::unix::fs::symlink(test_bin(), bin.join(name));
    }
    bin
}

#[test]
fn cron_style_and_t_with_bcc() {
    let mut inst = Instance::new("", "");
    inst.start();
    let bin = links(&inst);
    // cron: sendmail -FCronDaemon -i -B8BITMIME -oem alice
    let out = inst.sendmail_cmd(
        Command::new(bin.join("sendmail"))
            .env("QMS_CONFIG", &inst.config)
            .args(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "alice"]),
        b"Subject: Cron <root@host> run-parts\n\n.\nline after a lone dot\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // mail(1) and mutt: sendmail -oi -t, recipients from the headers, Bcc removed.
    let out = inst.sendmail_cmd(
        Command::new(bin.join("sendmail"))
            .env("QMS_CONFIG", &inst.config)
            .args(["-oi", "-t"]),
        b"To: alice@example.test\nBcc: bob@example.test\nSubject: from mail\n\nhello both\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("alice's two messages", Duration::from_secs(30), || {
        inst.count_new("alice") == 2
    });
    wait_for("bob's copy", Duration::from_secs(30), || {
        inst.count_new("bob") == 1
    });
    let alice = inst.read_maildir("alice");
    let cron = alice
        .iter()
        .find(|m| m.contains("run-parts"))
        .expect("the cron mail");
    assert!(
        cron.contains("\n.\nline after a lone dot"),
        "-i must keep a lone dot: {cron}"
    );
    assert!(
        cron.contains("From: \"CronDaemon\" <root@example.test>"),
        "{cron}"
    );
    assert!(
        cron.contains("Date: ") && cron.contains("Message-ID: <"),
        "{cron}"
    );
    for m in alice
        .iter()
        .chain(inst.read_maildir("bob").iter())
        .filter(|m| m.contains("hello both"))
    {
        assert!(!m.to_ascii_lowercase().contains("bcc:"), "Bcc leaked: {m}");
    }
}

#[test]
fn f_is_believed_only_for_trusted_users() {
    let mut inst = Instance::new("", "");
    inst.start();
    let out = inst.sendmail(
        &["-f", "robot@else.test", "alice@example.test"],
        &message("trusted", "x"),
    );
    assert!(out.status.success());
    wait_for("the message", Duration::from_secs(30), || {
        inst.count_new("alice") == 1
    });
    let m = &inst.read_maildir("alice")[0];
    if is_root() {
        assert!(m.starts_with("Return-Path: <robot@else.test>"), "{m}");
        // An untrusted user's -f is replaced by their own address.
        let out = inst.sendmail_cmd(
            Command::new(BIN)
                .arg("-c")
                .arg(&inst.config)
                .args(["sendmail", "-f", "ceo@example.test", "alice@example.test"])
                .uid(65534)
                .gid(65534),
            &message("untrusted", "y"),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_for("the second message", Duration::from_secs(30), || {
            inst.count_new("alice") == 2
        });
        let m = inst
            .read_maildir("alice")
            .into_iter()
            .find(|m| m.contains("untrusted"))
            .unwrap();
        assert!(m.starts_with("Return-Path: <nobody@example.test>"), "{m}");
    }
}

#[test]
fn bs_speaks_smtp_on_stdin() {
    let mut inst = Instance::new("", "");
    inst.start();
    let dialogue = b"EHLO localhost\r\nMAIL FROM:<root@example.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<nosuchuser@example.test>\r\nDATA\r\nSubject: bs\r\n\r\n..dot stuffed\r\n.\r\nQUIT\r\n";
    let out = inst.sendmail(&["-bs"], dialogue);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("220 "), "{text}");
    assert!(
        text.contains("550 5.1.1"),
        "unknown user must be refused: {text}"
    );
    assert!(text.contains("250 2.0.0 Ok: queued as"), "{text}");
    assert!(text.trim_end().ends_with("221 2.0.0 Bye"), "{text}");
    wait_for("the message", Duration::from_secs(30), || {
        inst.count_new("alice") == 1
    });
    assert!(inst.read_maildir("alice")[0].contains("\n.dot stuffed\n"));
}

#[test]
fn mailq_and_errors() {
    let mut inst = Instance::new("", "[routes]\n\"later.test\" = \"pipe:exit 75\"\n");
    inst.start();
    let bin = links(&inst);
    let out = inst.sendmail(&["x@later.test"], &message("waits", "z"));
    assert!(out.status.success());
    wait_for("the deferral", Duration::from_secs(30), || {
        inst.queue_json()
            .iter()
            .any(|j| j["recipients"][0]["state"] == "deferred")
    });
    let out = Command::new(bin.join("mailq"))
        .env("QMS_CONFIG", &inst.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("x@later.test")
            && text.contains("[deferred]")
            && text.contains("root@example.test"),
        "{text}"
    );
    let out = Command::new(bin.join("sendmail"))
        .env("QMS_CONFIG", &inst.config)
        .arg("-bp")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);

    // An empty message and a missing recipient are clear errors with sysexits codes.
    let out = inst.sendmail(&["alice@example.test"], b"");
    assert_eq!(out.status.code(), Some(66));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no message"));
    let out = inst.sendmail(&[], &message("nobody", "n"));
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no recipients"));
    let out = inst.sendmail(&["-bd"], b"");
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn check_config_names_file_line_and_key() {
    let inst = Instance::new("", "[routes]\n\"bad.test\" = \"teleport\"\n");
    let out = inst.qms(&["check-config"]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = std::fs::read_to_string(&inst.config)
        .unwrap()
        .lines()
        .position(|l| l.contains("teleport"))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("qms.toml:{line}:"))
            && err.contains("bad.test")
            && err.contains("teleport"),
        "{err}"
    );
}

/// Issue #14.2 and #14.3: cron's `To: root`-style bare names with -t get the local domain,
/// and a successful sendmail writes nothing on stderr; its log line goes to the mail log.
#[test]
fn t_takes_bare_names_and_success_is_silent() {
    let mut inst = Instance::new("", "");
    inst.start();
    let bin = links(&inst);
    let (sock, sock_path) = fake_syslog(&inst.dir);
    let out = inst.sendmail_cmd(
        Command::new(bin.join("sendmail"))
            .env("QMS_CONFIG", &inst.config)
            .env("QMS_SYSLOG_SOCKET", &sock_path)
            .args(["-oi", "-t"]),
        b"To: alice, bob\nSubject: bare names\n\nfrom cron\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty() && out.stdout.is_empty(),
        "a sendmail that succeeds says nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut buf = vec![0u8; 4096];
    let n = sock.recv(&mut buf).expect("a line in the mail log");
    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        line.starts_with("<22>qms/sendmail[") && line.contains("status=queued"),
        "{line}"
    );
    wait_for("both copies", Duration::from_secs(30), || {
        inst.count_new("alice") == 1 && inst.count_new("bob") == 1
    });
    // A refusal still goes to stderr, for the caller to see.
    let out = inst.sendmail_cmd(
        Command::new(bin.join("sendmail"))
            .env("QMS_CONFIG", &inst.config)
            .env("QMS_SYSLOG_SOCKET", &sock_path)
            .args(["-oi", "-t"]),
        b"Subject: nobody\n\nto no one\n",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no recipients"));
}

/// The queue listing socket, which anyone may use, served one client at a time, each for as
/// long as its writes made progress within 10 s: a client that did not read kept `mailq`
/// from everyone else, and was then cut off with half a listing. Now a few clients are
/// served at once, each for up to 30 s however slowly it reads.
#[test]
fn a_listing_client_that_does_not_read_cannot_keep_mailq_from_others() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let dead = free_port();
    let mut inst = relay_instance(
        &[("dead.test", dead)],
        "[outgoing]\nmin_backoff = 3600\nmax_backoff = 3600\n",
    );
    inst.start();
    // A listing larger than a socket's buffer: ten messages of 100 recipients, deferred.
    let rcpts: Vec<String> = (0..100)
        .map(|i| format!("recipient-number-{i:03}@dead.test"))
        .collect();
    let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    for i in 0..10 {
        let body = format!("Subject: listing {i}\r\n\r\nhello\r\n");
        smtp_send(inst.smtp_port, "alice@example.test", &rcpts, &body, "");
    }
    wait_for("1,000 deferred recipients", Duration::from_secs(60), || {
        let jobs = inst.queue_json();
        let deferred = jobs
            .iter()
            .flat_map(|j| j["recipients"].as_array().cloned().unwrap_or_default())
            .filter(|r| r["reply"].as_str().is_some_and(|r| !r.is_empty()))
            .count();
        jobs.len() == 10 && deferred == 1000
    });
    let socket = inst.spool().join("public/showq");
    let listing = |mut c: UnixStream| {
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut text = String::new();
        let _ = c.read_to_string(&mut text);
        text
    };
    // The first client connects and reads nothing for now.
    let held = UnixStream::connect(&socket).unwrap();
    let other = listing(UnixStream::connect(&socket).unwrap());
    assert_eq!(other.lines().count(), 10, "{}", other.len());
    let held = listing(held);
    assert!(
        held.ends_with('\n') && held.lines().count() == 10,
        "the waiting client got {} bytes, {} lines",
        held.len(),
        held.lines().count()
    );
    for line in held.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("a whole JSON line");
    }
}
