//! The reports qms writes, read back by real readers (Python's `email` package) and by
//! `qms dsn classify`: the success report of a local delivery that asked for one, a failure
//! report returning an 8-bit message whole, and a co-recipient notice whose subject is not
//! ASCII.

mod common;
use common::*;
use std::time::Duration;

/// Parses `msg` with Python's email package and prints what the checks need.
const READ: &str = r#"
import email, sys
from email import policy
raw = open(sys.argv[1], "rb").read()
m = email.message_from_bytes(raw, policy=policy.default)
print("type=" + m.get_content_type())
print("report-type=" + str(m.get_param("report-type")))
print("subject=" + str(m["subject"]))
print("raw-ascii-head=" + str(all(b < 128 for b in raw.split(b"\r\n\r\n")[0])))
for p in m.walk():
    ct = p.get_content_type()
    print("part=" + ct + " cte=" + str(p.get("content-transfer-encoding")))
    if ct == "message/delivery-status":
        for block in p.get_payload():
            for k, v in block.items():
                print("ds:" + k + "=" + v)
    if ct == "message/rfc822":
        inner = p.get_payload()[0]
        print("returned-subject=" + str(inner["subject"]))
        print("returned-body=" + inner.get_content().strip())
"#;

fn read_with_python(inst: &Instance, msg: &str) -> String {
    let path = inst.dir.join(format!("read-{}.eml", msg.len()));
    let crlf = msg.replace("\r\n", "\n").replace('\n', "\r\n");
    std::fs::write(&path, crlf).unwrap();
    let (ok, out) = python(READ, &[path.display().to_string()]);
    assert!(ok, "{out}");
    out
}

fn classify(inst: &Instance, msg: &str) -> serde_json::Value {
    let path = inst.dir.join("classify.eml");
    std::fs::write(&path, msg).unwrap();
    let out = std::process::Command::new(test_bin())
        .args(["dsn", "classify"])
        .arg(&path)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!("{}", String::from_utf8_lossy(&out.stderr));
    })
}

#[test]
fn success_report_of_a_local_delivery() {
    let mut inst = Instance::new("", "");
    inst.start();
    smtp_send(
        inst.smtp_port,
        "bob@example.test",
        &["alice@example.test"],
        "Subject: tell me\r\n\r\nplease\r\n",
        "NOTIFY=SUCCESS ENVID=env-7",
    );
    wait_for("the success report to bob", Duration::from_secs(30), || {
        inst.read_maildir("bob")
            .iter()
            .any(|m| m.contains("multipart/report"))
    });
    assert_eq!(inst.count_new("alice"), 1);
    let report = inst
        .read_maildir("bob")
        .into_iter()
        .find(|m| m.contains("multipart/report"))
        .unwrap();
    let seen = read_with_python(&inst, &report);
    for want in [
        "type=multipart/report",
        "report-type=delivery-status",
        "ds:Final-Recipient=rfc822; alice@example.test",
        "ds:Action=delivered",
        "ds:Status=2.0.0",
        "ds:Original-Envelope-Id=env-7",
    ] {
        assert!(
            seen.lines().any(|l| l == want),
            "{want} in {seen}\n{report}"
        );
    }
    let c = classify(&inst, &report);
    assert_eq!(c["kind"], "dsn");
    assert_eq!(c["recipients"][0]["action"], "delivered");
    assert_eq!(c["envid"], "env-7");
}

#[test]
fn failure_report_returns_an_8bit_message_whole() {
    // A recipient accepted at RCPT whose delivery then fails for good.
    let mut inst = Instance::new(
        "",
        "[routes]\n\"gone@example.test\" = \"pipe:echo 'no such mailbox: user unknown' >&2; exit 67\"\n",
    );
    inst.start();
    let script = "import smtplib,sys\ns=smtplib.SMTP('127.0.0.1',int(sys.argv[1]),timeout=30)\ns.ehlo()\n\
s.sendmail('bob@example.test',['gone@example.test'],'Subject: caf\\xe9\\r\\n\\r\\nna\\xefve body\\r\\n'.encode('utf-8'),mail_options=['BODY=8BITMIME'])\ns.quit()";
    let (ok, out) = python(script, &[inst.smtp_port.to_string()]);
    assert!(ok, "{out}");
    wait_for("the failure report to bob", Duration::from_secs(30), || {
        inst.count_new("bob") == 1
    });
    // Read as bytes: the returned message is 8-bit.
    let file = std::fs::read_dir(inst.maildir("bob").join("new"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let report = String::from_utf8(std::fs::read(file).unwrap()).unwrap();
    let seen = read_with_python(&inst, &report);
    assert!(
        seen.contains("part=message/rfc822 cte=8bit")
            && seen.contains("ds:Action=failed")
            && seen.contains("returned-subject=café"),
        "{seen}"
    );
    assert!(
        report.contains("naïve body"),
        "returned byte for byte: {report}"
    );
    let c = classify(&inst, &report);
    let r = &c["recipients"][0];
    assert_eq!(
        (
            r["address"].as_str(),
            r["action"].as_str(),
            r["reason"].as_str()
        ),
        (
            Some("gone@example.test"),
            Some("failed"),
            Some("user unknown")
        ),
        "{c}"
    );
}

#[test]
fn co_recipient_notice_with_a_subject_in_any_script() {
    let (inst, ok, _bad) = tracked_loop("co_recipient_notices = true\n");
    let msg = "From: app@example.test\nTo: a@ok.test, b@bad.test\nMessage-ID: <utf-1@example.test>\n\
X-B-Envelope-Addr: bounces@example.test\nBX-Non-Delivery-Notification-Req-To: bounces@example.test\n\
X-B-CrossRef: utf-1\nSubject: =?utf-8?q?Angebot_f=C3=BCr_Sie_=E2=80=93_=E6=97=A5=E6=9C=AC?=\n\nWillkommen.\n";
    assert!(inst.sendmail(&["-t"], msg.as_bytes()).status.success());
    wait_for("the notice at a@ok.test", Duration::from_secs(60), || {
        ok.messages()
            .iter()
            .any(|m| m.contains("Auto-Submitted: auto-generated"))
    });
    let notice = ok
        .messages()
        .into_iter()
        .find(|m| m.contains("Auto-Submitted: auto-generated"))
        .unwrap();
    // smtp-sink's dump starts with its own lines; the message begins at its first field.
    let start = notice.find("From: ").unwrap_or(0);
    let seen = read_with_python(&inst, &notice[start..]);
    assert!(
        seen.contains("subject=Not delivered to b@bad.test: Angebot für Sie – 日本")
            && seen.contains("raw-ascii-head=True"),
        "{seen}\n{notice}"
    );
}
