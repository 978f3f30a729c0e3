//! TLS (STARTTLS and implicit) and AUTH, with openssl s_client and Python's smtplib.

mod common;
use common::*;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

const PASSWORD: &str = "correct horse battery";

fn tls_instance() -> Instance {
    let sub = free_port();
    let inst = Instance::new(
        "",
        &format!(
            "[submissions]\nlisten = [\"127.0.0.1:{sub}\"]\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n[auth]\nusers = \"users\"\nmax_failures = 3\n[routes]\n\"far.test\" = \"pipe:cat > /dev/null\"\n"
        ),
    );
    make_cert(&inst.dir, "mx.example.test");
    std::fs::write(inst.dir.join("users"), passwd_line("alice", PASSWORD)).unwrap();
    inst.own();
    inst
}

fn submissions_port(inst: &Instance) -> u16 {
    let cfg = std::fs::read_to_string(&inst.config).unwrap();
    let after = cfg
        .split("[submissions]\nlisten = [\"127.0.0.1:")
        .nth(1)
        .unwrap();
    after.split('"').next().unwrap().parse().unwrap()
}

#[test]
fn starttls_with_openssl_s_client_offers_auth_only_after_tls() {
    let mut inst = tls_instance();
    inst.start();
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", inst.smtp_port)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain.write_all(b"EHLO c\r\nQUIT\r\n").unwrap();
    let mut text = String::new();
    let _ = plain.read_to_string(&mut text);
    assert!(
        text.contains("250-STARTTLS") && !text.contains("AUTH"),
        "{text}"
    );

    let mut s = Command::new("openssl")
        .args([
            "s_client",
            "-starttls",
            "smtp",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{}", inst.smtp_port),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    s.stdin
        .take()
        .unwrap()
        .write_all(b"EHLO client.test\r\nQUIT\r\n")
        .unwrap();
    let out = s.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("250-AUTH PLAIN LOGIN") && !text.contains("STARTTLS") && text.contains("221"),
        "{text}"
    );
    assert!(inst.log().contains("tls=\"TLSv1"), "{}", inst.log());
}

#[test]
fn auth_over_tls_relays_and_plain_auth_is_refused() {
    let mut inst = tls_instance();
    inst.start();
    let script = r#"
import smtplib, ssl, sys
port, sub, pw = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ctx = ssl._create_unverified_context()
# AUTH before TLS: refused, and not offered.
s = smtplib.SMTP("127.0.0.1", sub, timeout=20)
s.ehlo()
assert not s.has_extn("auth")
code, msg = s.docmd("AUTH", "PLAIN AGFsaWNlAHg=")
assert code == 538, (code, msg)
# Submission needs AUTH before MAIL.
code, msg = s.docmd("MAIL", "FROM:<alice@example.test>")
assert code == 530, (code, msg)
s.starttls(context=ctx)
s.ehlo()
assert s.has_extn("auth")
s.login("alice", pw)
# Authenticated: relaying to a foreign domain is allowed, but only with an owned sender.
try:
    s.sendmail("ceo@example.test", ["x@far.test"], "Subject: spoof\r\n\r\nno\r\n")
    raise SystemExit("a sender not owned was accepted")
except smtplib.SMTPSenderRefused as e:
    assert e.smtp_code == 553, e
s.sendmail("alice@example.test", ["x@far.test", "bob@example.test"], "Subject: over tls\r\n\r\nhello\r\n")
s.quit()
# Implicit TLS (port 465's role).
t = smtplib.SMTP_SSL("127.0.0.1", int(sys.argv[4]), context=ctx, timeout=20)
t.login("alice", pw)
t.sendmail("alice+tag@example.test", ["bob@example.test"], "Subject: implicit\r\n\r\nhi\r\n")
t.quit()
"#;
    let (ok, out) = python(
        script,
        &[
            inst.smtp_port.to_string(),
            inst.submission_port.to_string(),
            PASSWORD.to_string(),
            submissions_port(&inst).to_string(),
        ],
    );
    assert!(ok, "{out}");
    wait_for("bob's two copies", Duration::from_secs(30), || {
        inst.count_new("bob") == 2
    });
    let msgs = inst.read_maildir("bob");
    let m = msgs.iter().find(|m| m.contains("over tls")).unwrap();
    assert!(
        m.contains("with ESMTPSA id") && m.contains("(using TLSv1"),
        "{m}"
    );
    assert!(
        m.contains("Message-ID: <") && m.contains("Date: "),
        "submission adds Message-ID and Date: {m}"
    );
    let log = inst.log();
    assert!(
        log.contains("sasl_user=alice status=authenticated"),
        "{log}"
    );
    assert!(!log.contains(PASSWORD), "the password reached the log");
    assert!(!msgs.iter().any(|m| m.contains(PASSWORD)));
}

#[test]
fn failed_auth_is_slowed_then_locked_out() {
    let mut inst = tls_instance();
    inst.start();
    let script = r#"
import smtplib, ssl, sys, base64
ctx = ssl._create_unverified_context()
codes = []
bad = base64.b64encode(b"\0alice\0wrong password").decode()
for i in range(4):
    s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30)
    s.starttls(context=ctx)
    s.ehlo()
    try:
        code, msg = s.docmd("AUTH", "PLAIN " + bad)
    except smtplib.SMTPServerDisconnected:
        code = 421
    codes.append(code)
    try:
        s.quit()
    except Exception:
        pass
print(codes)
assert codes == [535, 535, 535, 421], codes
"#;
    let (ok, out) = python(script, &[inst.submission_port.to_string()]);
    assert!(ok, "{out}");
    assert!(inst.log().contains("too many failed AUTH attempts"));
}

#[test]
fn command_pipelined_after_starttls_is_refused() {
    let mut inst = tls_instance();
    inst.start();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", inst.smtp_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    assert!(
        text.contains("554 5.5.1 Error: command pipelined after STARTTLS"),
        "{text}"
    );
    assert!(!text.contains("220 2.0.0 Ready"), "{text}");
}

/// The subject of the certificate the server at `port` shows after STARTTLS, for SNI `name`
/// (none when empty).
fn served_subject(port: u16, name: &str) -> String {
    let mut args = vec![
        "s_client".to_string(),
        "-starttls".into(),
        "smtp".into(),
        "-connect".into(),
        format!("127.0.0.1:{port}"),
    ];
    if name.is_empty() {
        args.push("-noservername".into());
    } else {
        args.extend(["-servername".into(), name.to_string()]);
    }
    let mut s = Command::new("openssl")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    s.stdin.take().unwrap().write_all(b"QUIT\r\n").unwrap();
    let out = s.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("subject="))
        .unwrap_or_else(|| panic!("no certificate shown: {text}"))
        .to_string()
}

/// Issue #16: `[tls.sni."NAME"]` serves another certificate to clients that ask for NAME
/// (SNI), as Postfix's tls_server_sni_maps; every other client gets `[tls] cert`.
#[test]
fn a_client_asking_for_another_name_gets_its_certificate() {
    let mut inst = tls_instance();
    let other = inst.dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    make_cert(&other, "mail.other.test");
    inst.own();
    inst.edit_config(
        "[auth]",
        "[tls.sni.\"Mail.Other.Test\"]\ncert = \"other/cert.pem\"\nkey = \"other/key.pem\"\n[auth]",
    );
    inst.start();
    let port = inst.smtp_port;
    assert!(served_subject(port, "mail.other.test").contains("mail.other.test"));
    assert!(served_subject(port, "MAIL.OTHER.TEST").contains("mail.other.test"));
    assert!(served_subject(port, "mx.example.test").contains("mx.example.test"));
    assert!(served_subject(port, "").contains("mx.example.test"));
}

/// Issue #17: `[auth] dovecot` checks submission logins with a real Dovecot, so a password
/// only Dovecot knows works for sending; a wrong one is refused, and neither is logged.
#[test]
fn dovecot_checks_the_logins_of_submission() {
    let mut inst = Instance::new("", "");
    let dovecot = Dovecot::start(&inst.dir, "carol", "only dovecot knows");
    inst.edit_config(
        "[scheduler]",
        &format!(
            "[auth]\ndovecot = \"{}\"\nplaintext_loopback = true\n[scheduler]",
            dovecot.auth_socket.display()
        ),
    );
    wait_for("dovecot's auth socket", Duration::from_secs(20), || {
        dovecot.auth_socket.exists()
    });
    inst.own();
    inst.start();
    let script = r#"
import smtplib, sys
port, password = int(sys.argv[1]), sys.argv[2]
s = smtplib.SMTP("127.0.0.1", port, timeout=30)
s.ehlo("client.test")
try:
    s.login("carol", password)
except smtplib.SMTPAuthenticationError as e:
    print("refused", e.smtp_code)
    sys.exit(0)
s.sendmail("carol@example.test", ["alice@example.test"], "Subject: via dovecot\r\n\r\nhi\r\n")
print("sent")
s.quit()
"#;
    let port = inst.submission_port.to_string();
    let (ok, out) = python(script, &[port.clone(), "not the password".into()]);
    assert!(ok && out.contains("refused 535"), "{out}");
    let (ok, out) = python(script, &[port.clone(), "only dovecot knows".into()]);
    assert!(ok && out.contains("sent"), "{out}\n{}", dovecot.log());
    wait_for("the message", Duration::from_secs(30), || {
        inst.count_new("alice") == 1
    });
    let log = inst.log();
    assert!(
        log.contains("sasl_user=carol status=authenticated"),
        "{log}"
    );
    assert!(log.contains("status=auth-failed"), "{log}");
    assert!(!log.contains("dovecot knows") && !log.contains("not the password"));
    // Dovecot gone: a temporary failure, not a refusal of the password.
    drop(dovecot);
    let (ok, out) = python(script, &[port, "only dovecot knows".into()]);
    assert!(ok && out.contains("refused 454"), "{out}");
    assert!(inst.log().contains("status=auth-unavailable"));
}

/// Issue #16: a renewed certificate (new files put in place, as certbot does) is served
/// after SIGHUP, without a restart, when qms's user may read it.
#[test]
fn a_renewed_certificate_is_served_after_sighup() {
    let mut inst = tls_instance();
    inst.start();
    assert!(served_subject(inst.smtp_port, "").contains("mx.example.test"));
    let new = inst.dir.join("renewed");
    std::fs::create_dir_all(&new).unwrap();
    make_cert(&new, "renewed.example.test");
    inst.own();
    // New inodes under the old names: the descriptors opened at start still show the old.
    for f in ["cert.pem", "key.pem"] {
        std::fs::rename(new.join(f), inst.dir.join(f)).unwrap();
    }
    assert!(served_subject(inst.smtp_port, "").contains("mx.example.test"));
    inst.reload();
    wait_for("the renewed certificate", Duration::from_secs(30), || {
        served_subject(inst.smtp_port, "").contains("renewed.example.test")
    });
    assert!(inst.log().contains("tls=reopened"), "{}", inst.log());
}

/// Makes `name.pem`/`name.key` in `dir`: a client certificate for DNS name `cn`, signed by
/// the CA in `dir` (ca.pem, ca.key), or by itself when `self_signed`.
fn client_cert(dir: &std::path::Path, name: &str, cn: &str, self_signed: bool) {
    let (key, pem, csr) = (
        format!("{name}.key"),
        format!("{name}.pem"),
        format!("{name}.csr"),
    );
    let subject = format!("/CN={cn}");
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName=DNS:{cn}\nextendedKeyUsage=clientAuth\n"),
    )
    .unwrap();
    let ext = format!("{name}.ext");
    if self_signed {
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &subject,
                "-keyout",
                &key,
                "-out",
                &pem,
                "-addext",
                &format!("subjectAltName=DNS:{cn}"),
            ],
            dir,
        );
        return;
    }
    openssl(
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", &subject, "-keyout", &key, "-out",
            &csr,
        ],
        dir,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
        dir,
    );
}

/// Issue #16: with `[tls] client_ca`, smtpd asks for client certificates; one that verifies
/// for a name of `relay_clients` may relay, and its subject is logged. One that does not
/// verify (self-signed) or names another host is still taken for TLS, and may not relay.
#[test]
fn a_verified_client_certificate_of_a_listed_name_may_relay() {
    let mut inst = tls_instance();
    let ca = inst.dir.join("clients");
    std::fs::create_dir_all(&ca).unwrap();
    make_ca_cert(&ca, "unused.test");
    client_cert(&ca, "partner", "mx.partner.test", false);
    client_cert(&ca, "other", "mx.other.test", false);
    client_cert(&ca, "forged", "mx.partner.test", true);
    inst.own();
    inst.edit_config(
        "[auth]",
        "client_ca = \"clients/ca.pem\"\nrelay_clients = [\"mx.partner.test\"]\n[auth]",
    );
    inst.start();
    let script = r#"
import smtplib, ssl, sys
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
if cert:
    ctx.load_cert_chain(cert, key)
s = smtplib.SMTP("127.0.0.1", port, timeout=30)
s.starttls(context=ctx)
s.ehlo("client.test")
s.mail("someone@partner.test")
code, reply = s.rcpt("x@far.test")
print(code)
s.quit()
"#;
    let rcpt = |name: &str| -> String {
        let (cert, key) = match name {
            "" => (String::new(), String::new()),
            n => (
                ca.join(format!("{n}.pem")).display().to_string(),
                ca.join(format!("{n}.key")).display().to_string(),
            ),
        };
        let (ok, out) = python(script, &[inst.smtp_port.to_string(), cert, key]);
        assert!(ok, "{out}");
        out.trim().to_string()
    };
    assert_eq!(rcpt("partner"), "250", "{}", inst.log());
    assert_eq!(rcpt("other"), "554", "{}", inst.log());
    assert_eq!(rcpt("forged"), "554", "{}", inst.log());
    assert_eq!(rcpt(""), "554", "{}", inst.log());
    let log = inst.log();
    assert!(
        log.contains("subject CN=mx.partner.test, issuer CN=qms test CA, client certificate verified, may relay"),
        "{log}"
    );
    assert!(
        log.contains("CN=mx.other.test, issuer CN=qms test CA, client certificate verified\""),
        "{log}"
    );
    assert!(log.contains("client certificate not verified"), "{log}");
}
