//! `qms dsn classify` over report fixtures written from RFC 3464 and RFC 8098 and from the
//! formats Postfix, Sendmail, Exchange, Gmail, qmail (QSBMF), Exim and Yahoo produce.

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
    let out = Command::new(BIN)
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
