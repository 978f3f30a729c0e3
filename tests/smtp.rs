//! The SMTP server driven by real clients: Python's smtplib, swaks, and raw sockets for the
//! byte-exact cases (pipelining, smuggling payloads, disconnects).

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

/// Sends raw bytes and reads until the server has answered `replies` lines that end a reply.
fn talk(port: u16, input: &[u8], replies: usize) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(input).unwrap();
    let mut r = BufReader::new(s);
    let mut out = String::new();
    let mut done = 0;
    while done < replies {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if line.len() >= 4 && line.as_bytes()[3] == b' ' {
            done += 1;
        }
        out.push_str(&line);
    }
    out
}

#[test]
fn smtplib_plain_many_recipients_and_dot_stuffing() {
    let mut inst = Instance::new("", "");
    inst.start();
    let script = r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20)
s.ehlo("client.test")
assert s.has_extn("pipelining") and s.has_extn("dsn") and s.has_extn("chunking") and s.has_extn("size")
body = "Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"
refused = s.sendmail("sender@remote.test", ["alice@example.test", "bob@example.test"], body)
assert refused == {}, refused
try:
    s.sendmail("sender@remote.test", ["nosuch@example.test"], "Subject: x\r\n\r\nx\r\n")
    raise SystemExit("unknown user accepted")
except smtplib.SMTPRecipientsRefused as e:
    assert e.recipients["nosuch@example.test"][0] == 550, e.recipients
try:
    s.sendmail("sender@remote.test", ["someone@elsewhere.test"], "Subject: x\r\n\r\nx\r\n")
    raise SystemExit("relay allowed")
except smtplib.SMTPRecipientsRefused as e:
    assert e.recipients["someone@elsewhere.test"][0] == 554, e.recipients
s.quit()
"#;
    let (ok, out) = python(script, &[inst.smtp_port.to_string()]);
    assert!(ok, "{out}");
    wait_for("both copies", Duration::from_secs(30), || {
        inst.count_new("alice") == 1 && inst.count_new("bob") == 1
    });
    let m = &inst.read_maildir("alice")[0];
    assert!(
        m.contains("\n.leading dot\n..two dots\n.\nend\n"),
        "dot-stuffing not undone exactly: {m:?}"
    );
    assert!(
        m.contains("Received: from client.test ([127.0.0.1])"),
        "{m}"
    );
    assert!(inst.log().contains("status=reject") && inst.log().contains("Relay access denied"));
}

#[test]
fn swaks_and_pipelined_transactions() {
    let mut inst = Instance::new("", "");
    inst.start();
    let out = Command::new("swaks")
        .args([
            "--server",
            &format!("127.0.0.1:{}", inst.smtp_port),
            "--from",
            "a@remote.test",
            "--to",
            "alice@example.test",
            "--pipeline",
            "--silent",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Two transactions in one write: every reply comes back, in order.
    let input =
        b"EHLO c.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n";
    let mut s = TcpStream::connect(("127.0.0.1", inst.smtp_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(input).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut seen = String::new();
    while !seen.contains("354 ") {
        let mut l = String::new();
        assert!(r.read_line(&mut l).unwrap() > 0, "{seen}");
        seen.push_str(&l);
    }
    s.write_all(b"Subject: one\r\n\r\n1\r\n.\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nSubject: two\r\n\r\n2\r\n.\r\nQUIT\r\n").unwrap();
    let mut rest = String::new();
    let _ = r.read_to_string(&mut rest);
    assert_eq!(rest.matches("250 2.0.0 Ok: queued as").count(), 2, "{rest}");
    assert!(rest.trim_end().ends_with("221 2.0.0 Bye"), "{rest}");
    wait_for("all three", Duration::from_secs(30), || {
        inst.count_new("alice") == 2 && inst.count_new("bob") == 1
    });
}

#[test]
fn smuggling_payloads_never_end_data() {
    let mut inst = Instance::new("", "");
    inst.start();
    for (i, payload) in [&b"\n.\n"[..], b"\r\n.\n", b"\n.\r\n", b"\r.\r"]
        .iter()
        .enumerate()
    {
        let mut input = b"EHLO c.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: outer\r\n\r\nhello".to_vec();
        input.extend_from_slice(payload);
        input.extend_from_slice(b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nowned\r\n.\r\nQUIT\r\n");
        let out = talk(inst.smtp_port, &input, 7);
        assert!(out.contains("554 5.6.11"), "payload {i}: {out}");
        assert!(
            !out.contains("queued as"),
            "payload {i} accepted something: {out}"
        );
    }
    // Nothing was spooled: no message for alice, nothing smuggled to bob.
    assert!(inst.files("queue/incoming").is_empty() && inst.files("queue/local").is_empty());
    assert_eq!(inst.count_new("bob"), 0);
    assert_eq!(inst.count_new("alice"), 0);
}

#[test]
fn limits_and_errors() {
    let mut inst = Instance::new("", "[limits]\nmessage_size = 10000\n");
    inst.start();
    // An over-long command line: 500, and the session goes on.
    let long = format!("EHLO {}\r\nNOOP\r\nQUIT\r\n", "x".repeat(5000));
    let out = talk(inst.smtp_port, long.as_bytes(), 4);
    assert!(
        out.contains("500 5.5.2 Line too long")
            && out.contains("250 2.0.0 Ok")
            && out.contains("221"),
        "{out}"
    );
    // SIZE too large at MAIL, and an oversized message at DATA.
    let out = talk(
        inst.smtp_port,
        b"EHLO c\r\nMAIL FROM:<a@remote.test> SIZE=20000\r\nQUIT\r\n",
        4,
    );
    assert!(out.contains("552 5.3.4"), "{out}");
    let mut big =
        b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n".to_vec();
    for _ in 0..300 {
        big.extend_from_slice(&[b'y'; 98]);
        big.extend_from_slice(b"\r\n");
    }
    big.extend_from_slice(b".\r\nQUIT\r\n");
    let out = talk(inst.smtp_port, &big, 7);
    assert!(out.contains("552 5.3.4 Message too big"), "{out}");
    // Wrong order and bad syntax.
    let out = talk(inst.smtp_port, b"MAIL FROM:<a@remote.test>\r\nEHLO c\r\nRCPT TO:<alice@example.test>\r\nMAIL FROM:a@b\r\nFOO\r\nQUIT\r\n", 7);
    assert!(
        out.contains("503 5.5.1") && out.contains("501 5.5.4") && out.contains("500 5.5.2"),
        "{out}"
    );
    // AUTH is not offered without a users file (AUTH before TLS is tested in tls_auth.rs).
    let out = talk(
        inst.smtp_port,
        b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nQUIT\r\n",
        4,
    );
    assert!(out.contains("502 5.5.1"), "{out}");
    assert!(
        !inst.log().contains("c2VjcmV0") && !inst.log().contains("AGFsaWNl"),
        "credentials reached the log"
    );
}

#[test]
fn disconnect_mid_data_leaves_nothing() {
    let mut inst = Instance::new("", "");
    inst.start();
    {
        let mut s = TcpStream::connect(("127.0.0.1", inst.smtp_port)).unwrap();
        s.write_all(b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: cut\r\n\r\nhalf of a mess").unwrap();
        let mut buf = [0u8; 512];
        let mut got = String::new();
        while !got.contains("354") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    wait_for("the session to end", Duration::from_secs(20), || {
        inst.log().contains("connection lost in DATA")
    });
    assert!(
        inst.files("queue/incoming").is_empty()
            && inst.files("msg").is_empty()
            && inst.files("tmp").is_empty()
    );
}

#[test]
fn dsn_parameters_and_bdat_are_stored() {
    let mut inst = Instance::new("", "[routes]\n\"hold.test\" = \"pipe:exit 75\"\n[outgoing]\nmin_backoff = 3600\nmax_backoff = 3600\n");
    inst.edit_config(
        "local = [\"example.test\"]",
        "local = [\"example.test\"]\nrelay = [\"hold.test\"]",
    );
    inst.start();
    let input = b"EHLO c\r\nMAIL FROM:<a@remote.test> RET=HDRS ENVID=env+2B1\r\nRCPT TO:<alice@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice+2Bx@example.test\r\nBDAT 20\r\nSubject: chunked\r\n\r\nBDAT 4 LAST\r\nhi\r\nQUIT\r\n";
    let out = talk(inst.smtp_port, input, 7);
    assert!(
        out.contains("250 2.0.0 20 bytes received") && out.contains("queued as"),
        "{out}"
    );
    wait_for("delivery", Duration::from_secs(30), || {
        inst.count_new("alice") == 1
    });
    assert!(inst.read_maildir("alice")[0].ends_with("Subject: chunked\n\nhi\n"));
    // The DSN fields stay with the job: look at one that waits.
    let input = b"EHLO c\r\nMAIL FROM:<root@example.test> RET=FULL ENVID=abc\r\nRCPT TO:<x@hold.test> NOTIFY=NEVER ORCPT=rfc822;x@hold.test\r\nDATA\r\nSubject: w\r\n\r\nw\r\n.\r\nQUIT\r\n";
    let out = talk(inst.smtp_port, input, 6);
    assert!(out.contains("queued as"), "{out}");
    wait_for("the deferral", Duration::from_secs(30), || {
        !inst.files("deferred/pipe").is_empty()
            && inst
                .queue_json()
                .iter()
                .any(|j| j["recipients"][0]["state"] == "deferred")
    });
    let name = &inst.files("deferred/pipe")[0];
    let (job, _) = read_job_file(&inst.spool().join("deferred/pipe").join(name));
    assert_eq!(job["ret"], "full");
    assert_eq!(job["envid"], "abc");
    assert_eq!(job["recipients"][0]["notify"], serde_json::json!(["never"]));
    assert_eq!(job["recipients"][0]["orcpt"], "rfc822;x@hold.test");
}

#[test]
fn mynetworks_may_relay() {
    let mut inst = Instance::new("", "[routes]\n\"far.test\" = \"pipe:cat > /dev/null\"\n");
    inst.edit_config("[smtp]\n", "[smtp]\nmynetworks = [\"127.0.0.0/8\"]\n");
    inst.start();
    let out = talk(
        inst.smtp_port,
        b"EHLO c\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<z@far.test>\r\nQUIT\r\n",
        4,
    );
    assert!(out.contains("250 2.1.5"), "{out}");
}

#[test]
fn session_and_connection_limits() {
    let mut inst = Instance::new(
        "",
        "[limits]\nrecipients = 3\nconnections_per_client = 2\nerrors = 4\n",
    );
    inst.start();
    // Recipients over the limit: 452 4.5.3, the first ones stay accepted.
    let out = talk(
        inst.smtp_port,
        b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nRCPT TO:<alice+x@example.test>\r\nRCPT TO:<bob+y@example.test>\r\nQUIT\r\n",
        7,
    );
    assert_eq!(out.matches("250 2.1.5").count(), 3, "{out}");
    assert!(out.contains("452 4.5.3"), "{out}");
    // Too many errors: the session is closed.
    let out = talk(
        inst.smtp_port,
        b"EHLO c\r\nFOO\r\nBAR\r\nBAZ\r\nQUX\r\nNOOP\r\n",
        6,
    );
    assert!(out.contains("421 4.7.0 Too many errors"), "{out}");
    assert!(!out.contains("250 2.0.0 Ok"), "{out}");
    // Two stalled sessions from one address hold its quota; a third is refused at once,
    // and neither stalls anyone's mail once they are gone.
    // A session's slot is given back just after its last reply: open the two stalled
    // sessions once both get a banner.
    let banner = |s: &mut TcpStream| -> bool {
        let mut buf = [0u8; 100];
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"220 "))
    };
    let mut pair = None;
    wait_for(
        "two sessions with a banner",
        Duration::from_secs(20),
        || {
            let mut a = TcpStream::connect(("127.0.0.1", inst.smtp_port)).unwrap();
            let mut b = TcpStream::connect(("127.0.0.1", inst.smtp_port)).unwrap();
            if banner(&mut a) && banner(&mut b) {
                pair = Some((a, b));
                return true;
            }
            false
        },
    );
    let (a, mut b) = pair.unwrap();
    b.write_all(b"EHLO half-a-comm").unwrap();
    let third = talk(inst.smtp_port, b"", 1);
    assert!(
        third.starts_with("421 4.7.0 Too many connections from your address"),
        "{third}"
    );
    drop((a, b));
    wait_for("the quota to free up", Duration::from_secs(20), || {
        talk(inst.smtp_port, b"QUIT\r\n", 2).contains("221")
    });
}

#[test]
fn a_stalled_client_does_not_block_another() {
    let mut inst = Instance::new("", "");
    inst.start();
    // One client stops in the middle of DATA and sends nothing more.
    let mut stalled = TcpStream::connect(("127.0.0.1", inst.smtp_port)).unwrap();
    stalled.write_all(b"EHLO slow\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: never ends\r\n").unwrap();
    // Another delivers meanwhile.
    let out = talk(inst.smtp_port, b"EHLO quick\r\nMAIL FROM:<b@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nSubject: quick\r\n\r\nq\r\n.\r\nQUIT\r\n", 7);
    assert!(out.contains("queued as"), "{out}");
    wait_for("bob's mail", Duration::from_secs(30), || {
        inst.count_new("bob") == 1
    });
    assert_eq!(inst.count_new("alice"), 0);
    drop(stalled);
}

#[test]
fn json_log_lines() {
    let mut inst = Instance::new("", "[log]\nformat = \"json\"\n");
    inst.start();
    let out = talk(inst.smtp_port, b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: j\r\n\r\nj\r\n.\r\nQUIT\r\n", 7);
    assert!(out.contains("queued as"), "{out}");
    wait_for("delivery", Duration::from_secs(30), || {
        inst.count_new("alice") == 1
    });
    wait_for("the delivery log line", Duration::from_secs(10), || {
        inst.log().contains("\"status\":\"sent\"")
    });
    let lines: Vec<serde_json::Value> = inst
        .log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let queued = lines
        .iter()
        .find(|l| l["status"] == "queued")
        .expect("a queued line");
    assert_eq!(queued["role"], "smtpd");
    assert_eq!(queued["to"], "alice@example.test");
    let id = queued["qid"].as_str().unwrap();
    assert!(lines
        .iter()
        .any(|l| l["qid"] == id && l["role"] == "deliver/local" && l["status"] == "sent"));
}
