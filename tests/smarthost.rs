//! Per-message smarthosts and relay hosts with credentials: the login goes over verified TLS
//! only, never into a log or a transcript (X822-MSP's BX-MTA-Rem-* fields, `[relay_auth]`).

mod common;
use common::*;
use std::time::Duration;

const SECRET: &str = "s3cret-Smarthost-pw";

fn current_user() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A second qms as the smarthost: submission (STARTTLS) and submissions (TLS) with AUTH,
/// user `app` whose password is SECRET, mailbox carol@peer.test.
fn smarthost_peer() -> (Instance, u16) {
    let subs = free_port();
    let peer = Instance::new(
        "",
        &format!(
            "[submissions]\nlisten = [\"127.0.0.1:{subs}\"]\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
[auth]\nusers = \"users\"\nsenders = {{ app = [\"@example.test\"] }}\n"
        ),
    );
    peer.carol_at(&["peer.test"]);
    make_ca_cert(&peer.dir, "peer.test");
    std::fs::write(peer.dir.join("users"), passwd_line("app", SECRET)).unwrap();
    peer.own();
    (peer, subs)
}

fn via(port: u16, security: &str, password: &str, extra: &str, subject: &str) -> String {
    format!(
        "X-B-Envelope-Addr: alice@example.test\nBX-MTA-Rem-Protocol: submission\n\
BX-MTA-Rem-Host: 127.0.0.1\nBX-MTA-Rem-Port: {port}\nBX-MTA-Rem-LinkConfidentiality: {security}\n\
BX-MTA-Rem-User: app\nBX-MTA-Rem-Passwd: {password}\n{extra}\
From: alice@example.test\nTo: carol@peer.test\nSubject: {subject}\n\nthrough the smarthost\n"
    )
}

#[test]
fn per_message_smarthost_with_credentials_and_a_debug_transcript() {
    let (mut peer, subs) = smarthost_peer();
    peer.start();
    // Credentials go only where the certificate is verified: 127.0.0.1 by the peer's CA;
    // `localhost` (the same server) has no CA named and is not in the system's roots.
    let mut inst = Instance::new(
        "",
        &format!(
            "[msp]\nsmarthost_users = [\"{}\"]\n[msp.ca_files]\n\"127.0.0.1\" = \"{}\"\n",
            current_user(),
            peer.dir.join("ca.pem").display()
        ),
    );
    inst.start();
    let unverified = via(subs, "ssl", SECRET, "", "unverified")
        .replace("BX-MTA-Rem-Host: 127.0.0.1", "BX-MTA-Rem-Host: localhost");
    let starttls = via(
        peer.submission_port,
        "tls",
        SECRET,
        "BX-Sending-Run-Control: debug\n",
        "via starttls",
    );
    let implicit = via(subs, "ssl", SECRET, "X-B-CrossRef: sh-2\n", "via ssl");
    let wrong = via(subs, "ssl", "not-the-password", "", "wrong password");
    let cert =
        |c: &str, k: &str| format!("BX-MTA-Rem-CertFile: {}\nBX-MTA-Rem-KeyFile: {}\n", c, k);
    let (pem, key) = (peer.dir.join("cert.pem"), peer.dir.join("key.pem"));
    let with_cert = via(
        subs,
        "ssl",
        SECRET,
        &cert(&pem.display().to_string(), &key.display().to_string()),
        "with a client certificate",
    );
    let no_cert = via(
        subs,
        "ssl",
        SECRET,
        &cert("/nonexistent.pem", "/nonexistent.key"),
        "no cert",
    );
    for m in [
        &starttls,
        &implicit,
        &wrong,
        &with_cert,
        &no_cert,
        &unverified,
    ] {
        let out = inst.sendmail(&["carol@peer.test"], m.as_bytes());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_for(
        "three messages at the smarthost",
        Duration::from_secs(30),
        || peer.count_new("carol") == 3,
    );
    let got = peer.read_maildir("carol");
    for subject in ["via starttls", "via ssl", "with a client certificate"] {
        let m = got.iter().find(|m| m.contains(subject)).expect(subject);
        let head = m.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        assert!(!head.contains("\nbx-"), "BX- fields left qms: {m}");
        assert!(m.contains("with ESMTPSA"), "authenticated under TLS: {m}");
    }
    // A refused login defers the message (Postfix's soft bounce), it does not lose it.
    wait_for_reply(&inst, "the refused login in the queue", |r| {
        r.contains("authentication as app") && r.contains("failed")
    });
    wait_for_reply(&inst, "the unreadable certificate in the queue", |r| {
        r.contains("cannot read client certificate /nonexistent.pem")
    });
    wait_for_reply(&inst, "the unverified smarthost deferred", |r| {
        r.contains("4.7.5") && r.contains("certificate not verified")
    });
    assert_eq!(
        peer.count_new("carol"),
        3,
        "the unverified smarthost got the message"
    );
    let id = inst.queue_json()[0]["id"].as_str().unwrap().to_string();
    let shown = String::from_utf8_lossy(&inst.qms(&["queue", "show", &id]).stdout).into_owned();
    assert!(shown.contains("smarthost: [127.0.0.1]"), "{shown}");
    // The debug run logged the dialogue, with the credentials hidden.
    let log = inst.log();
    let transcript: Vec<&str> = log.lines().filter(|l| l.contains("debug=smtp")).collect();
    for want in [
        "line=\"220 ",
        "STARTTLS",
        "TLS started",
        "AUTH PLAIN (credentials hidden)",
        "line=\"235 ",
        "MAIL FROM:<alice@example.test>",
        "RCPT TO:<carol@peer.test>",
        "bytes)",
    ] {
        assert!(
            transcript.iter().any(|l| l.contains(want)),
            "no {want:?} in the transcript: {transcript:#?}"
        );
    }
    assert!(
        !log.lines()
            .any(|l| l.contains("dir=> line=\"AUTH PLAIN ") && !l.contains("(credentials hidden)")),
        "an AUTH token was logged: {}",
        log.lines()
            .filter(|l| l.contains("AUTH PLAIN "))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Only the debugged message has a transcript.
    assert!(!transcript.iter().any(|l| l.contains("Subject")));
    let ids: std::collections::BTreeSet<&str> = transcript
        .iter()
        .filter_map(|l| l.split("qid=").nth(1)?.split(' ').next())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    // The password is nowhere but the queued job it belongs to.
    let track =
        String::from_utf8_lossy(&inst.qms(&["track", "sh-2", "--json"]).stdout).into_owned();
    assert!(track.contains("relayed"), "{track}");
    let mut places = vec![log, peer.log(), shown, track];
    places.extend(got);
    for f in inst.files("track") {
        places
            .push(std::fs::read_to_string(inst.spool().join("track").join(f)).unwrap_or_default());
    }
    for p in &places {
        assert!(
            !p.contains(SECRET) && !p.contains("not-the-password"),
            "a password leaked: {p}"
        );
    }
}

/// Issue #16: a relay host of the routing table with a login from the config
/// (`[relay_auth]`, Postfix's relayhost with SASL): the login goes over verified TLS only,
/// and a refused login defers with the server's reply.
#[test]
fn relay_auth_logs_in_to_a_relay_host_only_over_verified_tls() {
    let (mut peer, _) = smarthost_peer();
    peer.start();
    let port = peer.submission_port;
    let inst = Instance::new(
        "",
        &format!(
            "[routes]\n\"peer.test\" = \"smtp:[127.0.0.1]:{port}\"\n\
             \"unverified.test\" = \"smtp:[localhost]:{port}\"\n\
             [outgoing]\nca_file = \"{ca}\"\nmin_backoff = \"1h\"\nconnection_reuse = 0\n\
             [outgoing.tls_routes]\n\"unverified.test\" = {{ level = \"may\", ca_file = \"/etc/ssl/certs/ca-certificates.crt\" }}\n\
             [relay_auth.\"127.0.0.1\"]\nuser = \"app\"\npassword_file = \"app.pass\"\n\
             [relay_auth.\"localhost\"]\nuser = \"app\"\npassword_file = \"app.pass\"\n",
            ca = peer.dir.join("ca.pem").display()
        ),
    );
    std::fs::write(inst.dir.join("app.pass"), format!("{SECRET}\n")).unwrap();
    inst.edit_config(
        "local = [\"example.test\"]",
        "local = [\"example.test\"]\nrelay = [\"peer.test\", \"unverified.test\"]",
    );
    let mut inst = inst;
    inst.own();
    inst.start();
    for to in ["carol@peer.test", "carol@unverified.test"] {
        smtp_send(
            inst.smtp_port,
            "alice@example.test",
            &[to],
            "Subject: relayhost\r\n\r\nx\r\n",
            "",
        );
    }
    let reply_of = |who: &str| -> Option<String> {
        inst.queue_json().iter().find_map(|j| {
            (j["recipients"][0]["address"] == who)
                .then(|| j["recipients"][0]["reply"].as_str().map(str::to_string))
                .flatten()
        })
    };
    wait_for("a delivery and a deferral", Duration::from_secs(30), || {
        peer.count_new("carol") == 1 && reply_of("carol@unverified.test").is_some()
    });
    // Delivered as the authenticated user: the peer's log names it.
    assert!(
        peer.log().contains("sasl_user=app status=authenticated"),
        "{}",
        peer.log()
    );
    let unverified = reply_of("carol@unverified.test").unwrap();
    assert!(
        unverified.contains("4.7.5")
            && unverified.contains("credentials are sent only to a verified server"),
        "{unverified}"
    );
    // The password is read when it is used: a wrong one is refused by the server, and the
    // mail waits with its reply.
    std::fs::write(inst.dir.join("app.pass"), "not it\n").unwrap();
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["carol@peer.test"],
        "Subject: wrong\r\n\r\nx\r\n",
        "",
    );
    wait_for("the refused login", Duration::from_secs(30), || {
        reply_of("carol@peer.test").is_some()
    });
    let wrong = reply_of("carol@peer.test").unwrap();
    assert!(wrong.contains("535"), "the server's refusal: {wrong}");
    assert_eq!(peer.count_new("carol"), 1);
    assert!(!inst.log().contains(SECRET), "the password is never logged");
}

/// Waits until a job in the queue has a first recipient whose reply `ok` accepts.
fn wait_for_reply(inst: &Instance, what: &str, ok: impl Fn(&str) -> bool) {
    wait_for(what, Duration::from_secs(30), || {
        inst.queue_json()
            .iter()
            .any(|j| j["recipients"][0]["reply"].as_str().is_some_and(&ok))
    });
}
