//! Where the logs go (`[log] target`): a file every process appends to, and the system log
//! for `qms start --daemon`, whose terminal is gone.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn a_log_file_gets_every_processs_lines() {
    let mut inst = Instance::new("", "[log]\ntarget = \"./mail.log\"\n");
    inst.start();
    // To an alias (postmaster: alice), so that the router routes it (see tests/direct.rs).
    smtp_send(
        inst.smtp_port,
        "a@remote.test",
        &["postmaster@example.test"],
        "Subject: f\r\n\r\nx\r\n",
        "",
    );
    let file = inst.dir.join("mail.log");
    wait_for(
        "the delivery in the log file",
        Duration::from_secs(30),
        || std::fs::read_to_string(&file).is_ok_and(|l| l.contains("status=sent")),
    );
    let lines = std::fs::read_to_string(&file).unwrap();
    for role in ["qms/smtpd[", "qms/router[", "qms/deliver/local["] {
        assert!(lines.contains(role), "{role} in {lines}");
    }
    assert!(!inst.log().contains("status=sent"), "nothing on stderr");
}

/// Issue #14: `qms start --daemon` must not lose its logs.
#[test]
fn a_detached_instance_logs_to_the_system_log() {
    let inst = Instance::new("", "");
    let (sock, sock_path) = fake_syslog(&inst.dir);
    // Read as a syslog daemon does, all the time, so that no line is dropped.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            let since = std::time::Instant::now();
            while since.elapsed() < Duration::from_secs(60) {
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        let mut s = seen.lock().unwrap();
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                        s.push('\n');
                        if s.contains("event=stop") {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return,
                }
            }
        })
    };
    let status = Command::new(test_bin())
        .arg("-c")
        .arg(&inst.config)
        .args(["start", "--daemon"])
        .env("QMS_SYSLOG_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let port = inst.smtp_port;
    wait_for("smtpd to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    smtp_send(
        port,
        "a@remote.test",
        &["alice@example.test"],
        "Subject: d\r\n\r\nx\r\n",
        "",
    );
    wait_for(
        "the delivery in the system log",
        Duration::from_secs(30),
        || seen.lock().unwrap().contains("status=sent"),
    );
    assert!(inst.qms(&["stop"]).status.success());
    let _ = reader.join();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.contains("<22>qms/smtpd[") && seen.contains("<22>qms/master["),
        "{seen}"
    );
}

/// Issue #14: with `[log] format = "postfix"`, Debian's pflogsumm summarises qms's log and
/// fail2ban's stock `postfix` and `postfix-sasl` (mode auth) filters find its rejects and
/// AUTH failures, each counted against what the test did.
#[test]
fn pflogsumm_and_fail2ban_read_a_postfix_shaped_log() {
    let (ok_port, bad_port) = (free_port(), free_port());
    let mut inst = relay_instance(
        &[("ok.test", ok_port), ("bad.test", bad_port)],
        "[log]\nformat = \"postfix\"\ntarget = \"./mail.log\"\nsyslog_name = \"postfix-qms\"\n\
         [auth]\nusers = \"users\"\nplaintext_loopback = true\nmax_failures = 100\n",
    );
    std::fs::write(inst.dir.join("users"), passwd_line("alice", "right")).unwrap();
    let _ok = Sink::start(&inst, "ok", "127.0.0.1", ok_port, &[]);
    let _bad = Sink::start(&inst, "bad", "127.0.0.1", bad_port, &["-f", "RCPT"]);
    inst.own();
    inst.start();
    let script = r#"
import smtplib, sys, base64
port = int(sys.argv[1])
def send(to):
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    s.ehlo("client.test")
    s.sendmail("bob@example.test", [to], "Subject: pf\r\n\r\n" + "x" * 500 + "\r\n")
    s.quit()
for _ in range(5): send("alice@example.test")
for _ in range(4): send("x@ok.test")
for _ in range(3): send("y@bad.test")
s = smtplib.SMTP("127.0.0.1", port, timeout=30)
s.ehlo("client.test")
s.mail("bob@example.test")
refused = [s.rcpt(t)[0] for t in ("z@elsewhere.test", "nobody@example.test")]
assert refused == [554, 550], refused
s.quit()
for _ in range(3):
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    s.ehlo("client.test")
    code, _ = s.docmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong").decode())
    assert code == 535, code
    s.quit()
"#;
    let (ok, out) = python(script, &[inst.smtp_port.to_string()]);
    assert!(ok, "{out}");
    for _ in 0..2 {
        let out = inst.sendmail(&["alice@example.test"], b"Subject: cron\n\nhi\n");
        assert!(out.status.success(), "{out:?}");
    }
    let file = inst.dir.join("mail.log");
    let read = || std::fs::read_to_string(&file).unwrap_or_default();
    // 5 + 2 to alice, 4 to ok.test, and bob's 3 reports of bad.test's refusals.
    wait_for(
        "14 deliveries and 3 bounces",
        Duration::from_secs(60),
        || {
            let l = read();
            l.matches(", status=sent (").count() == 14
                && l.matches(", status=bounced (").count() == 3
        },
    );
    let log = read();
    assert!(
        log.lines()
            .all(|l| l.contains(" mx.example.test postfix-qms/") && !l.contains(" status=queued")),
        "every line in Postfix's shape:\n{log}"
    );

    let out = Command::new("pflogsumm")
        .args(["--syslog-name=postfix-qms", "--smtpd-stats"])
        .arg(&file)
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{summary}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let total = |what: &str| -> u64 {
        summary
            .lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                let n = w.next()?.parse().ok()?;
                (w.collect::<Vec<_>>().join(" ") == what).then_some(n)
            })
            .unwrap_or_else(|| panic!("no {what:?} in pflogsumm's summary:\n{summary}"))
    };
    assert_eq!(total("received"), 14, "{summary}");
    assert_eq!(total("delivered"), 14, "{summary}");
    assert_eq!(total("bounced"), 3, "{summary}");
    assert_eq!(total("rejected (12%)"), 2, "{summary}");
    assert!(total("bytes received") > 12 * 500, "{summary}");
    // The 16 sessions above, and the harness's own check that the port listens.
    assert!((16..=17).contains(&total("connections")), "{summary}");

    for (filter, matched) in [("postfix", 2), ("postfix[mode=auth]", 3)] {
        let out = Command::new("fail2ban-regex")
            .args(["--print-all-matched"])
            .arg(&file)
            .arg(filter)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        let line = text
            .lines()
            .find(|l| l.starts_with("Lines:"))
            .unwrap_or_else(|| panic!("no Lines: in\n{text}"));
        assert!(
            line.contains(&format!(", {matched} matched")),
            "{filter}: {line}\n{text}"
        );
        assert!(
            text.contains("127.0.0.1"),
            "{filter} found the client: {text}"
        );
    }
}
