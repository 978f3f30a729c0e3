//! `[auth_checks]` (issue #15): SPF, DKIM, ARC and DMARC of mail arriving over SMTP, against
//! a real DNS server on loopback (dnsmasq) and messages signed and sealed by an independent
//! signer (Python's dkimpy); the results in one Authentication-Results field, forged ones
//! removed; mail DMARC quarantines held.

mod common;
use common::*;
use std::time::Duration;

use common::txt_record as txt;

/// Sends `msg` from `from` to alice over SMTP, signed by dkimpy with `key` for good.test
/// when given; the reply code to the end of DATA.
fn send(port: u16, from: &str, msg: &str, key: Option<&std::path::Path>) -> (u16, String) {
    send_as(port, from, msg, key, "dkim")
}

/// As `send`; `how` is `dkim` (a DKIM signature), `arc` (an ARC set sealed by the forwarder
/// forwarder.good.test) or `arc-broken` (that set, then the body changed).
fn send_as(
    port: u16,
    from: &str,
    msg: &str,
    key: Option<&std::path::Path>,
    how: &str,
) -> (u16, String) {
    send_to(port, from, "alice@example.test", msg, key, how)
}

/// As `send_as`, to `rcpt`.
fn send_to(
    port: u16,
    from: &str,
    rcpt: &str,
    msg: &str,
    key: Option<&std::path::Path>,
    how: &str,
) -> (u16, String) {
    let script = r#"
import smtplib, sys, dkim
port, sender, text, key, how, rcpt = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode(), sys.argv[4], sys.argv[5], sys.argv[6]
if key and how == "dkim":
    sig = dkim.sign(text, b"s1", b"good.test", open(key, "rb").read(),
                    include_headers=[b"From", b"To", b"Subject"])
    text = sig + text
elif key:
    text = b"Authentication-Results: forwarder.good.test; spf=pass smtp.mailfrom=good.test\r\n" + text
    seal = dkim.arc_sign(text, b"s1", b"good.test", open(key, "rb").read(), b"forwarder.good.test",
                         include_headers=[b"From", b"To", b"Subject"])
    text = b"".join(seal) + text
    if how == "arc-broken":
        text = text.replace(b"checked body", b"changed body")
s = smtplib.SMTP("127.0.0.1", port, timeout=60)
s.ehlo("client.test")
s.mail(sender)
s.rcpt(rcpt)
code, reply = s.data(text)
print(code, reply.decode())
s.quit()
"#;
    let key = key.map(|k| k.display().to_string()).unwrap_or_default();
    let (ok, out) = python(
        script,
        &[
            port.to_string(),
            from.to_string(),
            msg.to_string(),
            key,
            how.to_string(),
            rcpt.to_string(),
        ],
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
    // ARC (RFC 8617): a forwarder's seal over the message, whole and then broken.
    for (subject, how) in [("sealed", "arc"), ("broken", "arc-broken")] {
        let m = msg("Good <g@good.test>", subject);
        let (code, _) = send_as(inst.smtp_port, "g@good.test", &m, Some(&key), how);
        assert_eq!(code, 250);
    }
    wait_for("four messages for alice", Duration::from_secs(30), || {
        inst.count_new("alice") == 4
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
        || inst.count_new("alice") == 5,
    );
    let mail = inst.read_maildir("alice");
    let field = |subject: &str| -> String {
        let m = mail
            .iter()
            .find(|m| m.contains(&format!("Subject: {subject}")))
            .unwrap();
        // Each field: its first line and the folded lines after it.
        let mut fields: Vec<String> = Vec::new();
        let mut in_field = false;
        for line in m.lines() {
            if let Some(v) = line.strip_prefix("Authentication-Results:") {
                fields.push(v.to_string());
                in_field = true;
            } else if line.starts_with([' ', '\t']) && in_field {
                if let Some(f) = fields.last_mut() {
                    f.push_str(line);
                }
            } else if line.is_empty() {
                break;
            } else {
                in_field = false;
            }
        }
        // Ours, by our name; a forwarder's own field (the ARC messages) stays beside it.
        let ours: Vec<String> = fields
            .iter()
            .map(|f| f.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|f| f.starts_with("mx.example.test"))
            .collect();
        assert_eq!(
            ours.len(),
            1,
            "one Authentication-Results field of ours: {m}"
        );
        assert!(
            fields.len() == 1 || subject.starts_with("sealed") || subject.starts_with("broken"),
            "only ours: {m}"
        );
        ours[0].clone()
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
    let sealed = field("sealed");
    assert!(sealed.contains("arc=pass"), "{sealed}");
    assert!(good.contains("arc=none"), "{good}");
    // A seal whose body hash no longer matches: not a pass (mail-auth says neutral, with why).
    let broken = field("broken");
    assert!(
        broken.contains("arc=fail") || broken.contains("arc=neutral (body hash did not verify)"),
        "{broken}"
    );
    // The results are in the log line of each received message, and in `qms track`.
    let log = inst.log();
    assert!(
        log.contains("spf=pass dkim=pass arc=none dmarc=pass"),
        "{log}"
    );
    assert!(
        log.contains("spf=fail dkim=none arc=none dmarc=fail"),
        "{log}"
    );
    assert!(log.contains("arc=pass"), "{log}");
    wait_for("the results in qms track", Duration::from_secs(30), || {
        let out = inst.qms(&["track"]);
        String::from_utf8_lossy(&out.stdout).contains("spf=pass dkim=pass arc=none dmarc=pass")
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

/// The DNS TXT value `qms dkim keygen` prints for a new key at `path`.
fn keygen(inst: &Instance, domain: &str, selector: &str, path: &std::path::Path) -> String {
    let out = inst.qms(&[
        "dkim",
        "keygen",
        domain,
        selector,
        "--out",
        &path.display().to_string(),
    ]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .split('"')
        .skip(1)
        .step_by(2)
        .collect()
}

/// dkimpy's ARC verdict on `msg` (cv, and the reason), with the key records given by name.
fn arc_verify(msg: &str, records: &[(&str, &str)]) -> String {
    let check =
        "cv, results, reason = dkim.arc_verify(msg, dnsfunc=dnsfunc)\nprint(cv.decode(), reason)\n";
    dkimpy(check, msg, records)
}

#[test]
fn mail_an_alias_forwards_is_sealed_and_the_next_hop_can_verify_the_chain() {
    let sink_port = free_port();
    let mut inst = relay_instance(
        &[("ok.test", sink_port)],
        "[auth_checks]\nenabled = true\n[arc]\ndomain = \"example.test\"\nselector = \"arc1\"\nkey = \"arc.pem\"\n",
    );
    std::fs::write(
        inst.dir.join("aliases"),
        "postmaster: alice\nfwd: carol@ok.test\n",
    )
    .unwrap();
    let good_key = inst.dir.join("good.pem");
    let good = keygen(&inst, "good.test", "s1", &good_key);
    let ours = keygen(&inst, "example.test", "arc1", &inst.dir.join("arc.pem"));
    let (mut dns, dns_port) = dnsmasq(
        &inst,
        &[
            txt("good.test", "v=spf1 ip4:127.0.0.1 -all"),
            txt("s1._domainkey.good.test", &good),
            txt("_dmarc.good.test", "v=DMARC1; p=reject"),
            "--local=/test/".to_string(),
        ],
    );
    inst.edit_config(
        "[scheduler]",
        &format!("[dns]\nserver = \"127.0.0.1:{dns_port}\"\n[scheduler]"),
    );
    inst.own();
    let sink = Sink::start(&inst, "ok", "127.0.0.1", sink_port, &[]);
    inst.start();
    // Signed by its author; then one that a forwarder before us sealed; then one for a
    // mailbox here, which nothing forwards.
    let (code, _) = send_to(
        inst.smtp_port,
        "g@good.test",
        "fwd@example.test",
        &msg("Good <g@good.test>", "first hop"),
        Some(&good_key),
        "dkim",
    );
    assert_eq!(code, 250);
    let (code, _) = send_to(
        inst.smtp_port,
        "g@good.test",
        "fwd@example.test",
        &msg("Good <g@good.test>", "second hop"),
        Some(&good_key),
        "arc",
    );
    assert_eq!(code, 250);
    let (code, _) = send(
        inst.smtp_port,
        "g@good.test",
        &msg("Good <g@good.test>", "kept here"),
        Some(&good_key),
    );
    assert_eq!(code, 250);
    wait_for(
        "two forwarded and one kept",
        Duration::from_secs(30),
        || sink.messages().len() == 2 && inst.count_new("alice") == 1,
    );
    let _ = dns.kill();
    let records = [
        ("arc1._domainkey.example.test", ours.as_str()),
        ("s1._domainkey.good.test", good.as_str()),
    ];
    let msgs = sink.messages();
    for (subject, instance, cv) in [
        ("first hop", "i=1", "cv=none"),
        ("second hop", "i=2", "cv=pass"),
    ] {
        let m = msgs
            .iter()
            .find(|m| m.contains(&format!("Subject: {subject}")))
            .unwrap();
        // The sink's file starts with its own envelope lines; the message with our seal.
        let start = m
            .find("ARC-Seal:")
            .unwrap_or_else(|| panic!("not sealed: {m}"));
        let text = m[start..].replace("\r\n", "\n").replace('\n', "\r\n");
        let seal: String = text
            .lines()
            .take_while(|l| !l.starts_with("ARC-Message-Signature"))
            .collect();
        assert!(
            seal.contains(instance) && seal.contains(cv) && seal.contains("d=example.test"),
            "{seal}"
        );
        let aar = format!("ARC-Authentication-Results: {instance}; mx.example.test;");
        assert!(text.contains(&aar), "{text}");
        let verdict = arc_verify(&text, &records);
        assert!(
            verdict.starts_with("pass"),
            "{subject}: dkimpy says {verdict}\n{text}"
        );
    }
    // Not forwarded: no seal of ours.
    let kept = &inst.read_maildir("alice")[0];
    assert!(!kept.contains("d=example.test"), "{kept}");
}
