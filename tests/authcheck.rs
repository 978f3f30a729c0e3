//! `[auth_checks]` (issue #15): SPF, DKIM and DMARC of mail arriving over SMTP, against a
//! real DNS server on loopback (dnsmasq) and messages signed by an independent signer
//! (Python's dkimpy); the results in one Authentication-Results field, forged ones removed.

mod common;
use common::*;
use std::time::Duration;

use common::txt_record as txt;

/// Sends `msg` from `from` to alice over SMTP, signed by dkimpy with `key` for good.test
/// when given; the reply code to the end of DATA.
fn send(port: u16, from: &str, msg: &str, key: Option<&std::path::Path>) -> (u16, String) {
    let script = r#"
import smtplib, sys, dkim
port, sender, text, key = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode(), sys.argv[4]
if key:
    sig = dkim.sign(text, b"s1", b"good.test", open(key, "rb").read(),
                    include_headers=[b"From", b"To", b"Subject"])
    text = sig + text
s = smtplib.SMTP("127.0.0.1", port, timeout=60)
s.ehlo("client.test")
s.mail(sender)
s.rcpt("alice@example.test")
code, reply = s.data(text)
print(code, reply.decode())
s.quit()
"#;
    let key = key.map(|k| k.display().to_string()).unwrap_or_default();
    let (ok, out) = python(
        script,
        &[port.to_string(), from.to_string(), msg.to_string(), key],
    );
    assert!(ok, "{out}");
    let (code, text) = out.trim().split_once(' ').unwrap();
    (code.parse().unwrap(), text.to_string())
}

fn msg(from: &str, subject: &str) -> String {
    format!("From: {from}\r\nTo: alice@example.test\r\nSubject: {subject}\r\n\r\nchecked body\r\n")
}

#[test]
fn spf_dkim_and_dmarc_of_arriving_mail() {
    let mut inst = Instance::new("", "[auth_checks]\nenabled = true\nquarantine = \"hold\"\n");
    let key = inst.dir.join("good.pem");
    let out = inst.qms(&[
        "dkim",
        "keygen",
        "good.test",
        "s1",
        "--out",
        &key.display().to_string(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let record: String = String::from_utf8_lossy(&out.stdout)
        .split('"')
        .skip(1)
        .step_by(2)
        .collect();
    let (mut dns, dns_port) = dnsmasq(
        &inst,
        &[
            txt("good.test", "v=spf1 ip4:127.0.0.1 -all"),
            txt("s1._domainkey.good.test", &record),
            txt("_dmarc.good.test", "v=DMARC1; p=reject"),
            txt("bad.test", "v=spf1 -all"),
            txt("_dmarc.bad.test", "v=DMARC1; p=reject"),
            txt("soft.test", "v=spf1 -all"),
            txt("_dmarc.soft.test", "v=DMARC1; p=none"),
            txt("held.test", "v=spf1 -all"),
            txt("_dmarc.held.test", "v=DMARC1; p=quarantine"),
            // Authoritative for .test: a name it does not know does not exist (NXDOMAIN),
            // as the DMARC tree walk's `_dmarc.test` must find, rather than a failure.
            "--local=/test/".to_string(),
        ],
    );
    inst.edit_config(
        "[scheduler]",
        &format!("[dns]\nserver = \"127.0.0.1:{dns_port}\"\n[scheduler]"),
    );
    inst.start();

    // Signed, from an address whose SPF allows us, with a forged field claiming our name.
    let forged = format!(
        "Authentication-Results: mx.example.test; dkim=pass; spf=pass\r\n{}",
        msg("Good <g@good.test>", "good")
    );
    let (code, _) = send(inst.smtp_port, "g@good.test", &forged, Some(&key));
    assert_eq!(code, 250);
    // A domain whose DMARC policy says reject, forged: refused at the end of DATA.
    let (code, reply) = send(
        inst.smtp_port,
        "x@bad.test",
        &msg("x@bad.test", "bad"),
        None,
    );
    assert_eq!(code, 550, "{reply}");
    assert!(
        reply.contains("5.7.1") && reply.contains("DMARC"),
        "{reply}"
    );
    // p=none: accepted, and the failure is told.
    let (code, _) = send(
        inst.smtp_port,
        "y@soft.test",
        &msg("y@soft.test", "soft"),
        None,
    );
    assert_eq!(code, 250);
    // p=quarantine, with `quarantine = "hold"`: accepted, then held until released.
    let (code, _) = send(
        inst.smtp_port,
        "z@held.test",
        &msg("z@held.test", "held"),
        None,
    );
    assert_eq!(code, 250);
    wait_for("two messages for alice", Duration::from_secs(30), || {
        inst.count_new("alice") == 2
    });
    let _ = dns.kill();
    wait_for(
        "the quarantined message on hold",
        Duration::from_secs(30),
        || !inst.files("hold/local").is_empty(),
    );
    assert!(inst.log().contains("status=quarantined"), "{}", inst.log());
    let held = inst.files("hold/local");
    let id = held[0].trim_end_matches(".json");
    let out = inst.qms(&["queue", "release", id]);
    assert!(out.status.success(), "{out:?}");
    wait_for(
        "the released message delivered",
        Duration::from_secs(30),
        || inst.count_new("alice") == 3,
    );
    let mail = inst.read_maildir("alice");
    let field = |subject: &str| -> String {
        let m = mail
            .iter()
            .find(|m| m.contains(&format!("Subject: {subject}")))
            .unwrap();
        // Each field: its first line and the folded lines after it.
        let mut fields: Vec<String> = Vec::new();
        for line in m.lines() {
            if let Some(v) = line.strip_prefix("Authentication-Results:") {
                fields.push(v.to_string());
            } else if line.starts_with([' ', '\t']) && !fields.is_empty() {
                if let Some(f) = fields.last_mut() {
                    f.push_str(line);
                }
            } else if line.is_empty() {
                break;
            }
        }
        assert_eq!(fields.len(), 1, "one Authentication-Results field: {m}");
        fields[0].split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let good = field("good");
    assert!(good.starts_with("mx.example.test;"), "{good}");
    for r in ["spf=pass", "dkim=pass", "dmarc=pass"] {
        assert!(good.contains(r), "{r} in {good}");
    }
    let soft = field("soft");
    assert!(
        soft.contains("spf=fail") && soft.contains("dmarc=fail"),
        "{soft}"
    );
    assert!(!soft.contains("dkim=pass"), "{soft}");
    let held = field("held");
    assert!(held.contains("dmarc=fail"), "{held}");
    // The results are in the log line of each received message, and in `qms track`.
    let log = inst.log();
    assert!(log.contains("spf=pass dkim=pass dmarc=pass"), "{log}");
    assert!(log.contains("spf=fail dkim=none dmarc=fail"), "{log}");
    wait_for("the results in qms track", Duration::from_secs(30), || {
        let out = inst.qms(&["track"]);
        String::from_utf8_lossy(&out.stdout).contains("spf=pass dkim=pass dmarc=pass")
    });
}

#[test]
fn a_dns_failure_is_a_temporary_refusal_never_a_pass() {
    // A resolver port where nothing answers.
    let dead = free_port();
    let mut inst = Instance::new(
        "",
        &format!("[auth_checks]\nenabled = true\n[dns]\nserver = \"127.0.0.1:{dead}\"\n"),
    );
    inst.start();
    let (code, reply) = send(
        inst.smtp_port,
        "g@good.test",
        &msg("g@good.test", "dns"),
        None,
    );
    assert_eq!(code, 451, "{reply}");
    assert_eq!(inst.count_new("alice"), 0);
}
