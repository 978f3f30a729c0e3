//! DKIM signing (issue #15): keys made by `qms dkim keygen`, mail signed after the router's
//! changes, verified by an independent implementation (Python's dkimpy) against the record
//! keygen printed; `qms dkim check` against a real DNS server (dnsmasq).

mod common;
use common::*;
use std::time::Duration;

/// `qms dkim keygen`: the key file and the TXT record's text (its strings joined).
fn keygen(inst: &Instance, selector: &str, file: &str, ed25519: bool) -> String {
    let path = inst.dir.join(file).display().to_string();
    let mut args = vec!["dkim", "keygen", "example.test", selector, "--out", &path];
    if ed25519 {
        args.push("--ed25519");
    }
    let out = inst.qms(&args);
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        line.starts_with(&format!("{selector}._domainkey.example.test. IN TXT (")),
        "{line}"
    );
    let mode = std::fs::metadata(inst.dir.join(file)).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    line.split('"').skip(1).step_by(2).collect()
}

/// dkimpy's verdict on each signature of `msg`, with the records given by name.
fn verify(msg: &str, records: &[(&str, &str)]) -> Vec<bool> {
    let check = r#"
d = dkim.DKIM(msg)
n = msg.count(b"\nDKIM-Signature:") + msg.startswith(b"DKIM-Signature:")
def ok(i):
    try:
        return bool(d.verify(idx=i, dnsfunc=dnsfunc))
    except dkim.DKIMException:
        return False
print(json.dumps([ok(i) for i in range(n)]))
"#;
    serde_json::from_str(&dkimpy(check, msg, records)).unwrap()
}

#[test]
fn relayed_mail_is_signed_after_the_routers_changes_and_dkimpy_verifies_it() {
    let sink_port = free_port();
    let mut inst = relay_instance(
        &[("ok.test", sink_port)],
        "[dkim]\n\"example.test\" = [{ selector = \"rsa1\", key = \"rsa1.pem\" }, \
         { selector = \"ed1\", key = \"ed1.pem\" }]\n",
    );
    let rsa = keygen(&inst, "rsa1", "rsa1.pem", false);
    let ed = keygen(&inst, "ed1", "ed1.pem", true);
    assert!(rsa.starts_with("v=DKIM1; k=rsa; p=MIIB"), "{rsa}");
    assert!(ed.starts_with("v=DKIM1; k=ed25519; p="), "{ed}");
    inst.own();
    let sink = Sink::start(&inst, "ok", "127.0.0.1", sink_port, &[]);
    inst.start();
    // A local submission (trusted) with a field the router removes and one it keeps.
    let msg = "From: Alice <alice@example.test>\nTo: x@ok.test\nSubject: signed\n\
               BX-Sending-Run-Control: debug\nX-B-CrossRef: order-7\n\n\
               hello,  world \n\n\n";
    assert!(inst
        .sendmail(&["x@ok.test"], msg.as_bytes())
        .status
        .success());
    // A stranger over SMTP claiming the same domain is not vouched for.
    smtp_send(
        inst.smtp_port,
        "mallory@remote.test",
        &["y@ok.test"],
        "From: alice@example.test\r\nSubject: forged\r\n\r\nx\r\n",
        "",
    );
    wait_for("two messages at the sink", Duration::from_secs(30), || {
        sink.messages().len() == 2
    });
    let msgs = sink.messages();
    let signed = msgs.iter().find(|m| m.contains("Subject: signed")).unwrap();
    let forged = msgs.iter().find(|m| m.contains("Subject: forged")).unwrap();
    assert!(!forged.contains("DKIM-Signature:"), "{forged}");
    assert!(!signed.contains("BX-Sending-Run-Control") && signed.contains("X-B-CrossRef: order-7"));
    assert_eq!(signed.matches("DKIM-Signature:").count(), 2, "{signed}");
    assert!(signed.contains("d=example.test") && signed.contains("c=relaxed/relaxed"));
    // The sink's file starts with its own envelope lines; the message is from the first field.
    let start = signed.find("DKIM-Signature:").unwrap();
    let text = signed[start..].replace("\r\n", "\n").replace('\n', "\r\n");
    let records = [
        ("rsa1._domainkey.example.test", rsa.as_str()),
        ("ed1._domainkey.example.test", ed.as_str()),
    ];
    assert_eq!(verify(&text, &records), vec![true, true], "{text}");
    // From: is oversigned: one more than it occurs.
    let h = text.split("h=").nth(1).unwrap();
    assert!(
        h.split(';').next().unwrap().matches("From").count() >= 2,
        "{h}"
    );
    // A changed body fails: the verifier can say no.
    let broken = text.replace("hello,", "hullo,");
    assert_eq!(verify(&broken, &records), vec![false, false]);

    // qms dkim check against a real DNS server: right for example.test's two selectors...
    let txt = txt_record;
    let (mut dns, dns_port) = dnsmasq(
        &inst,
        &[
            txt("rsa1._domainkey.example.test", &rsa),
            txt("ed1._domainkey.example.test", &ed.replace("p=", "p=AAAA")),
        ],
    );
    inst.edit_config(
        "[scheduler]",
        &format!("[dns]\nserver = \"127.0.0.1:{dns_port}\"\n[scheduler]"),
    );
    let out = inst.qms(&["dkim", "check", "example.test"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = dns.kill();
    // ... and wrong where the record publishes another key.
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("rsa1._domainkey.example.test: ok"), "{text}");
    assert!(
        text.contains("ed1._domainkey.example.test: WRONG"),
        "{text}"
    );

    // A key qms cannot use is a check-config problem, named by domain and selector.
    std::fs::write(inst.dir.join("ed1.pem"), "not a key\n").unwrap();
    let out = inst.qms(&["check-config"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && err.contains("dkim.\"example.test\" selector ed1"),
        "{err}"
    );
}
