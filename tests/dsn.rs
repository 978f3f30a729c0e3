//! `qms dsn classify` over report fixtures written from RFC 3464, RFC 8098, RFC 5965 and
//! RFC 3834 and from the formats Postfix, Sendmail, Exchange, Gmail, qmail (QSBMF), Exim,
//! Yahoo and Amazon SES produce; and over mail as mailboxes really hold it (a leading mbox
//! `From ` line, bare CR or CRLF line ends, 8-bit text in an undeclared charset, HTML only,
//! a report forwarded as an attachment).

mod common;
use common::*;
use std::collections::HashMap;
use std::process::Command;

fn classify_all() -> (HashMap<String, serde_json::Value>, String, Option<i32>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bounces");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let out = Command::new(test_bin())
        .args(["dsn", "classify"])
        .args(&files)
        .output()
        .unwrap();
    let mut by_name = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let name = std::path::Path::new(v["file"].as_str().unwrap())
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        by_name.insert(name, v);
    }
    (
        by_name,
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

fn rcpt<'a>(v: &'a serde_json::Value, addr: &str) -> &'a serde_json::Value {
    v["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == addr)
        .unwrap_or_else(|| panic!("no {addr} in {v}"))
}

#[test]
fn classifies_every_format() {
    let (r, stderr, code) = classify_all();
    // Unreadable input is an error for that file alone; the others are still classified.
    assert!(
        stderr.contains("broken.bin: not a mail message"),
        "{stderr}"
    );
    assert_eq!(code, Some(65));
    assert!(!r.contains_key("broken.bin"));

    let pf = &r["postfix.eml"];
    assert_eq!(pf["kind"], "dsn");
    assert_eq!(pf["envid"], "offer-2026-17");
    assert_eq!(pf["reporting_mta"], "mx.sender.test");
    assert_eq!(pf["original_message_id"], "offer-17@sender.test");
    let bob = rcpt(pf, "bob@far.test");
    assert_eq!(
        (bob["action"].as_str(), bob["status"].as_str()),
        (Some("failed"), Some("5.1.1"))
    );
    assert!(
        bob["diagnostic"].as_str().unwrap().contains("User unknown"),
        "folded Diagnostic-Code unfolded: {bob}"
    );

    let sm = &r["sendmail.eml"];
    assert_eq!(
        (sm["kind"].as_str(), sm["original_message_id"].as_str()),
        (Some("dsn"), Some("m-sendmail@sender.test"))
    );
    assert_eq!(rcpt(sm, "carol@far.test")["status"], "5.2.2");

    let ex = &r["exchange.eml"];
    assert_eq!(rcpt(ex, "dave@corp.test")["status"], "5.1.10");
    assert_eq!(ex["original_message_id"], "offer-18@sender.test");

    let gm = &r["gmail-delay.eml"];
    assert_eq!(
        (
            rcpt(gm, "erin@slow.test")["action"].as_str(),
            rcpt(gm, "erin@slow.test")["status"].as_str()
        ),
        (Some("delayed"), Some("4.4.1"))
    );

    let ok = &r["success.eml"];
    assert_eq!(rcpt(ok, "frank@far.test")["action"], "delivered");
    assert_eq!(rcpt(ok, "gina@far.test")["action"], "relayed");
    assert_eq!(ok["envid"], "offer-2026-19");

    let mdn = &r["mdn.eml"];
    assert_eq!(
        (mdn["kind"].as_str(), mdn["original_message_id"].as_str()),
        (Some("mdn"), Some("offer-19@sender.test"))
    );
    assert_eq!(rcpt(mdn, "frank@far.test")["action"], "displayed");

    let q = &r["qmail.eml"];
    assert_eq!(q["kind"], "bounce");
    assert_eq!(
        q["recipients"].as_array().unwrap().len(),
        2,
        "the returned copy is not read for recipients: {q}"
    );
    assert_eq!(rcpt(q, "gus@far.test")["status"], "5.1.1");
    assert_eq!(rcpt(q, "hal@far.test")["status"], "5.7.1");
    assert_eq!(q["original_message_id"], "m-qmail@sender.test");

    let ex = &r["exim.eml"];
    assert_eq!(
        (
            ex["kind"].as_str(),
            rcpt(ex, "ivy@far.test")["status"].as_str()
        ),
        (Some("bounce"), Some("5.1.1"))
    );

    let y = &r["yahoo.eml"];
    assert_eq!(
        (
            y["kind"].as_str(),
            rcpt(y, "jo@yahoo.test")["action"].as_str()
        ),
        (Some("bounce"), Some("failed"))
    );

    let a = &r["autoreply.eml"];
    assert_eq!(
        (a["kind"].as_str(), a["original_message_id"].as_str()),
        (Some("autoreply"), Some("offer-20@sender.test"))
    );
    assert!(
        a["recipients"].as_array().unwrap().is_empty(),
        "an auto-reply is not a failure"
    );

    assert_eq!(r["other.eml"]["kind"], "other");
}

fn only(v: &serde_json::Value) -> (&str, &str, &str, &str) {
    let rs = v["recipients"].as_array().unwrap();
    assert_eq!(rs.len(), 1, "one recipient: {v}");
    let r = &rs[0];
    (
        r["address"].as_str().unwrap_or(""),
        r["action"].as_str().unwrap_or(""),
        r["status"].as_str().unwrap_or(""),
        r["reason"].as_str().unwrap_or(""),
    )
}

#[test]
fn reads_mail_as_it_really_arrives() {
    let (r, _, _) = classify_all();
    // Saved from an mbox: the `From ` line is no header field, but the file is mail.
    let m = &r["mbox-from.eml"];
    assert_eq!(m["kind"], "dsn");
    assert_eq!(
        only(m),
        ("list-alias@far.test", "failed", "5.2.2", "mailbox full")
    );
    assert_eq!(
        m["recipients"][0]["original_recipient"], "lena@far.test",
        "the address the sender used is kept beside the final one"
    );
    assert_eq!(m["original_message_id"], "offer-30@sender.test");

    let c = &r["cr-only.eml"];
    assert_eq!(c["kind"], "bounce");
    assert_eq!(only(c), ("mo@far.test", "failed", "5.1.1", "user unknown"));
    assert_eq!(c["original_message_id"], "offer-31@sender.test");

    let e = &r["exim-crlf.eml"];
    assert_eq!(only(e), ("ned@far.test", "failed", "5.7.1", "blocked"));

    let l = &r["latin1.eml"];
    assert_eq!(only(l).0, "sven@far.test");
    assert_eq!(only(l).3, "user unknown");

    let h = &r["html-only.eml"];
    assert_eq!(only(h).0, "tess@tenant.test");

    // A bounce forwarded by a help desk is read from inside the forward.
    let f = &r["forwarded.eml"];
    assert_eq!(f["kind"], "dsn");
    assert_eq!(
        only(f),
        ("quinn@corp.test", "failed", "5.1.10", "user unknown")
    );

    // Sendmail v5 names the recipient only in the returned message; the reply in the
    // transcript was transient, but the report is final.
    let t = &r["transcript-only.eml"];
    assert_eq!(only(t), ("rex@far.test", "failed", "5.0.0", "expired"));

    let s = &r["ses.eml"];
    assert_eq!(only(s), ("uma@far.test", "failed", "5.1.1", "user unknown"));
}

#[test]
fn complaints_and_auto_replies_are_not_failures() {
    let (r, _, _) = classify_all();
    let a = &r["arf.eml"];
    assert_eq!(
        (a["kind"].as_str(), a["feedback_type"].as_str()),
        (Some("feedback"), Some("abuse"))
    );
    assert_eq!(only(a).0, "olga@isp.test");
    assert_eq!(only(a).1, "complained");
    assert_eq!(a["original_message_id"], "offer-33@sender.test");

    // Words like "not delivered" in a vacation message do not make it a bounce.
    let v = &r["vacation.eml"];
    assert_eq!(v["kind"], "autoreply");
    assert!(v["recipients"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["original_message_id"], "offer-34@sender.test");
}
