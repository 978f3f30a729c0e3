//! Issue #16, transport security between MTAs: STARTTLS to a peer under the `encrypt`,
//! `verify` and `secure` policies, DANE against a real DNSSEC-signed zone validated by
//! Unbound, MTA-STS policies served over HTTPS, and the TLS reports of both.

mod common;
use common::*;
use std::time::Duration;

/// Lets the instance relay to `domains`, and gives it a mailbox for TLS reports.
fn relay_to(inst: &Instance, domains: &[&str]) {
    let quoted: Vec<String> = domains.iter().map(|d| format!("\"{d}\"")).collect();
    inst.edit_config(
        "local = [\"example.test\"]",
        &format!(
            "local = [\"example.test\"]\nrelay = [{}]",
            quoted.join(", ")
        ),
    );
    inst.edit_config(
        "[mailboxes]\n",
        "[mailboxes]\n\"tlsrpt@example.test\" = { maildir = \"mail/tlsrpt\" }\n",
    );
}

/// The delivery line of `to`.
fn sent_line(inst: &Instance, to: &str) -> String {
    let log = inst.log();
    log.lines()
        .find(|l| l.contains(&format!("to={to} ")) && l.contains("status=sent"))
        .unwrap_or_else(|| panic!("no delivery of {to}: {log}"))
        .to_string()
}

/// DANE (RFC 7672) at level `dane`: TLSA records in a signed zone that match the peer's key
/// (DANE-EE) or its CA (DANE-TA) deliver, verified; records that match nothing defer with
/// 4.7.5; an unsigned zone falls back to `may`; `dane-only` defers where there is no DANE.
#[test]
fn dane_checks_the_peer_against_signed_tlsa_records() {
    let domains = [
        "good.dane.test",
        "ta.dane.test",
        "bad.dane.test",
        "plain.test",
        "only.plain.test",
    ];
    let peer = tls_peer(&domains, &["mx-good.dane.test", "mx-ta.dane.test"]);
    let port = peer.smtp_port;
    let ee = spki_sha256(&peer.dir.join("cert.pem"));
    let ta = cert_sha256(&peer.dir.join("ca.pem"));
    let mx = |label: &str, host: &str| format!("{label} IN MX 10 {host}\n{host} IN A 127.0.0.1\n");
    let signed = format!(
        "{}_{port}._tcp.mx-good IN TLSA 3 1 1 {ee}\n\
         {}_{port}._tcp.mx-ta IN TLSA 2 0 1 {ta}\n\
         {}_{port}._tcp.mx-bad IN TLSA 3 1 1 {zeros}\n\
         _smtp._tls.bad IN TXT \"v=TLSRPTv1; rua=mailto:tlsrpt@example.test\"\n",
        mx("good", "mx-good"),
        mx("ta", "mx-ta"),
        mx("bad", "mx-bad"),
        zeros = "00".repeat(32),
    );
    let unsigned = format!("{}{}", mx("@", "mx"), mx("only", "mx-only"));
    let dir = std::env::temp_dir().join(format!("qms-dane-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let dns = signed_dns(&dir, ("dane.test", &signed), ("plain.test", &unsigned));
    let mut inst = Instance::new(
        "",
        &format!(
            "[dns]\nserver = \"127.0.0.1:{}\"\n[queues.smtp]\nworkers = 1\n\
             [outgoing]\nport = {port}\ntls = \"dane\"\nmin_backoff = \"1h\"\n\
             [outgoing.tls_routes]\n\"only.plain.test\" = \"dane-only\"\n",
            dns.port
        ),
    );
    relay_to(&inst, &domains);
    inst.start();
    send_to_carols(&inst, &domains, "dane");
    wait_for(
        "three deliveries and two deferrals",
        Duration::from_secs(30),
        || {
            peer.count_new("carol") == 3
                && queued_reply(&inst, "carol@bad.dane.test").is_some()
                && queued_reply(&inst, "carol@only.plain.test").is_some()
        },
    );
    let bad = queued_reply(&inst, "carol@bad.dane.test").unwrap();
    assert!(
        bad.contains("4.7.5 TLS level dane") && bad.contains("no TLSA record matches"),
        "{bad}"
    );
    let only = queued_reply(&inst, "carol@only.plain.test").unwrap();
    assert!(
        only.contains("4.7.5") && only.contains("dane-only"),
        "{only}"
    );
    for d in ["good.dane.test", "ta.dane.test"] {
        let line = sent_line(&inst, &format!("carol@{d}"));
        assert!(line.contains("verified (dane)"), "{line}");
    }
    let plain = sent_line(&inst, "carol@plain.test");
    assert!(plain.contains("not verified"), "{plain}");
    // TLS reporting: bad.dane.test asks for reports by mail; today's is sent on demand.
    let report = tls_report(&inst, "bad.dane.test");
    assert_eq!(report["policy"]["policy-type"], "tlsa", "{report}");
    assert!(report["policy"]["policy-string"][0]
        .as_str()
        .is_some_and(|s| s.starts_with("3 1 1 0000")));
    assert!(report["summary"]["total-failure-session-count"].as_u64() >= Some(1));
    assert_eq!(
        report["failure-details"][0]["result-type"], "validation-failure",
        "{report}"
    );
    assert_eq!(
        report["failure-details"][0]["receiving-mx-hostname"],
        "mx-bad.dane.test"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends today's TLS reports, waits for the one to tlsrpt@example.test, and returns the
/// policy entry for `domain` of the report read as RFC 8460 says: a multipart/report of
/// type tlsrpt whose application/tlsrpt+gzip part is the JSON.
fn tls_report(inst: &Instance, domain: &str) -> serde_json::Value {
    let out = inst.qms(&["tls-report", "--day", "today", "--send"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("the TLS report", Duration::from_secs(30), || {
        inst.count_new("tlsrpt") >= 1
    });
    let new = inst.maildir("tlsrpt").join("new");
    let file = std::fs::read_dir(&new)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let script = r#"
import sys, email, gzip, json
m = email.message_from_binary_file(open(sys.argv[1], 'rb'))
assert m.get_content_type() == 'multipart/report', m.get_content_type()
assert m.get_param('report-type') == 'tlsrpt'
assert m['TLS-Report-Domain'] == sys.argv[2], m['TLS-Report-Domain']
assert m['Subject'].startswith('Report Domain: ' + sys.argv[2] + ' Submitter: '), m['Subject']
part = [p for p in m.walk() if p.get_content_type() == 'application/tlsrpt+gzip'][0]
report = json.loads(gzip.decompress(part.get_payload(decode=True)))
for k in ('organization-name', 'date-range', 'contact-info', 'report-id', 'policies'):
    assert k in report, k
print(json.dumps([p for p in report['policies'] if p['policy']['policy-domain'] == sys.argv[2]][0]))
"#;
    let (ok, text) = python(script, &[file.display().to_string(), domain.to_string()]);
    assert!(ok, "{text}");
    serde_json::from_str(text.trim()).unwrap()
}

/// An HTTPS server on a loopback port serving `policies` (host, policy text) at
/// /.well-known/mta-sts.txt with the certificate in `dir` (chain.pem, key.pem), and taking
/// TLS reports POSTed to /tlsrpt into `dir/posted.gz`.
struct PolicyServer {
    child: std::process::Child,
    port: u16,
}

impl PolicyServer {
    fn start(dir: &std::path::Path, policies: &[(&str, &str)]) -> PolicyServer {
        let port = free_port();
        let map: serde_json::Map<String, serde_json::Value> = policies
            .iter()
            .map(|(h, p)| (h.to_string(), serde_json::Value::from(*p)))
            .collect();
        let script = r#"
import http.server, ssl, sys, json
policies = json.loads(sys.argv[3])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = policies.get(self.headers.get('Host', '').split(':')[0])
        if self.path != '/.well-known/mta-sts.txt' or body is None:
            self.send_error(404)
            return
        b = body.encode()
        self.send_response(200)
        self.send_header('Content-Type', 'text/plain')
        self.send_header('Content-Length', str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def do_POST(self):
        if self.path != '/tlsrpt' or self.headers.get('Content-Type') != 'application/tlsrpt+gzip':
            self.send_error(400)
            return
        body = self.rfile.read(int(self.headers.get('Content-Length', '0')))
        with open(sys.argv[2] + '/posted.gz.tmp', 'wb') as f:
            f.write(body)
        import os
        os.rename(sys.argv[2] + '/posted.gz.tmp', sys.argv[2] + '/posted.gz')
        self.send_response(200)
        self.send_header('Content-Length', '0')
        self.end_headers()
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2] + '/chain.pem', sys.argv[2] + '/key.pem')
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;
        let child = std::process::Command::new("python3")
            .args(["-c", script, &port.to_string()])
            .arg(dir)
            .arg(serde_json::Value::Object(map).to_string())
            .spawn()
            .unwrap();
        wait_for("the policy server", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        PolicyServer { child, port }
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// MTA-STS (RFC 8461): an `enforce` policy whose MX matches delivers over verified TLS; one
/// that does not list the MX defers with 4.7.5; `testing` delivers and reports the
/// certificate that would have failed; policies stay cached across a restart with the
/// policy server gone.
#[test]
fn mta_sts_policies_are_fetched_enforced_reported_and_cached() {
    let domains = ["sts.test", "bad-sts.test", "testing.test"];
    let peer = tls_peer(
        &domains,
        &[
            "mx.sts.test",
            "mta-sts.sts.test",
            "mta-sts.bad-sts.test",
            "mta-sts.testing.test",
        ],
    );
    let policy = |mode: &str, mx: &str| {
        format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n")
    };
    let https = PolicyServer::start(
        &peer.dir,
        &[
            ("mta-sts.sts.test", &policy("enforce", "*.sts.test")),
            ("mta-sts.bad-sts.test", &policy("enforce", "mx.other.test")),
            (
                "mta-sts.testing.test",
                &policy("testing", "mx-wrong.testing.test"),
            ),
        ],
    );
    let mut records = vec![
        "--mx-host=sts.test,mx.sts.test,10".to_string(),
        "--mx-host=bad-sts.test,mx.sts.test,10".to_string(),
        "--mx-host=testing.test,mx-wrong.testing.test,10".to_string(),
        "--host-record=mx.sts.test,127.0.0.1".to_string(),
        "--host-record=mx-wrong.testing.test,127.0.0.1".to_string(),
        "--txt-record=_smtp._tls.testing.test,v=TLSRPTv1; rua=mailto:tlsrpt@example.test"
            .to_string(),
        format!(
            "--txt-record=_smtp._tls.bad-sts.test,v=TLSRPTv1; rua=https://127.0.0.1:{}/tlsrpt",
            https.port
        ),
    ];
    for d in domains {
        records.push(format!("--txt-record=_mta-sts.{d},v=STSv1; id=20261126"));
        records.push(format!("--host-record=mta-sts.{d},127.0.0.1"));
    }
    let mut inst = Instance::new(
        "",
        &format!(
            "[queues.smtp]\nworkers = 1\n[outgoing]\nport = {}\nmta_sts_port = {}\n\
             ca_file = \"{}\"\nmin_backoff = \"1h\"\n",
            peer.smtp_port,
            https.port,
            peer.dir.join("ca.pem").display()
        ),
    );
    let (mut dnsmasq, dns_port) = dnsmasq(&inst, &records);
    inst.edit_config(
        "[queues.smtp]",
        &format!("[dns]\nserver = \"127.0.0.1:{dns_port}\"\n[queues.smtp]"),
    );
    relay_to(&inst, &domains);
    inst.start();
    send_to_carols(&inst, &domains, "sts");
    wait_for(
        "two deliveries and a deferral",
        Duration::from_secs(30),
        || peer.count_new("carol") == 2 && queued_reply(&inst, "carol@bad-sts.test").is_some(),
    );
    let bad = queued_reply(&inst, "carol@bad-sts.test").unwrap();
    assert!(
        bad.contains("4.7.5 MTA-STS policy of bad-sts.test does not list MX host mx.sts.test"),
        "{bad}"
    );
    let line = sent_line(&inst, "carol@sts.test");
    assert!(line.contains("verified (mta-sts)"), "{line}");
    let line = sent_line(&inst, "carol@testing.test");
    assert!(line.contains("not verified"), "{line}");
    let report = tls_report(&inst, "testing.test");
    assert_eq!(report["policy"]["policy-type"], "sts", "{report}");
    assert_eq!(report["policy"]["mx-host"][0], "mx-wrong.testing.test");
    assert_eq!(
        report["failure-details"][0]["result-type"], "certificate-host-mismatch",
        "{report}"
    );
    // bad-sts.test asked for its report by HTTPS: the POST carries the gzipped JSON.
    let posted = peer.dir.join("posted.gz");
    wait_for("the POSTed report", Duration::from_secs(30), || {
        posted.exists()
    });
    let script = r#"
import sys, gzip, json
r = json.loads(gzip.decompress(open(sys.argv[1], 'rb').read()))
p = r['policies'][0]
assert p['policy']['policy-domain'] == 'bad-sts.test', p
assert p['policy']['policy-type'] == 'sts', p
assert p['failure-details'][0]['result-type'] == 'validation-failure', p
assert p['failure-details'][0]['receiving-mx-hostname'] == 'mx.sts.test', p
print('ok')
"#;
    let (ok, text) = python(script, &[posted.display().to_string()]);
    assert!(ok, "{text}");
    // The policies are on disk; with the policy server gone and qms restarted, they hold.
    assert!(inst.spool().join("tls/mta-sts/bad-sts.test.json").exists());
    drop(https);
    inst.stop();
    inst.start();
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["carol@bad-sts.test", "carol@sts.test"],
        "Subject: after the restart\r\n\r\nx\r\n",
        "",
    );
    wait_for(
        "the delivery after the restart",
        Duration::from_secs(30),
        || peer.count_new("carol") == 3,
    );
    let line = sent_line(&inst, "carol@sts.test");
    assert!(line.contains("verified (mta-sts)"), "{line}");
    wait_for("the second deferral", Duration::from_secs(30), || {
        inst.queue_json()
            .iter()
            .filter(|j| {
                j["recipients"][0]["reply"]
                    .as_str()
                    .is_some_and(|r| r.contains("does not list MX host"))
            })
            .count()
            == 2
    });
    let _ = dnsmasq.kill();
}

#[test]
fn starttls_to_a_tls_peer_and_encrypt_policy() {
    // The receiving peer is a second qms with a certificate.
    let mut peer = Instance::new("", "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n");
    peer.carol_at(&["peer.test"]);
    make_cert(&peer.dir, "peer.test");
    peer.own();
    peer.start();
    let plain = free_port();
    let mut inst = relay_instance(
        &[("peer.test", peer.smtp_port), ("plain.test", plain)],
        "[outgoing]\ntls = \"may\"\n[outgoing.tls_routes]\n\"plain.test\" = \"encrypt\"\n",
    );
    let _sink = Sink::start(&inst, "plain", "127.0.0.1", plain, &[]);
    inst.start();
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["carol@peer.test", "z@plain.test"],
        "Subject: tls\r\n\r\nover tls\r\n",
        "",
    );
    wait_for("delivery at the peer", Duration::from_secs(30), || {
        peer.count_new("carol") == 1
    });
    let m = &peer.read_maildir("carol")[0];
    assert!(
        m.contains("with ESMTPS id") && m.contains("(using TLSv1"),
        "{m}"
    );
    // `encrypt` towards a server without STARTTLS: deferred, never sent in the clear.
    wait_for("the encrypt deferral", Duration::from_secs(30), || {
        inst.queue_json().iter().any(|j| {
            j["recipients"][0]["reply"]
                .as_str()
                .is_some_and(|r| r.contains("TLS is required"))
        })
    });
}

/// Issue #16: `verify` and `secure` check the peer's certificate (chain, then name), and
/// defer with 4.7.5 naming the level when it fails; `encrypt` takes any certificate.
#[test]
fn verify_and_secure_check_the_peers_certificate() {
    let domains = ["v.test", "nv.test", "sm.test", "s.test", "e.test"];
    // A certificate from a test CA, for peer.test, localhost and 127.0.0.1.
    let peer = tls_peer(&domains, &["peer.test"]);
    let ca = peer.dir.join("ca.pem").display().to_string();
    let routes: Vec<(&str, u16)> = domains.iter().map(|d| (*d, peer.smtp_port)).collect();
    let mut inst = relay_instance(
        &routes,
        &format!(
            "[queues.smtp]\nworkers = 1\n[outgoing]\nmin_backoff = \"1h\"\n[outgoing.tls_routes]\n\
             \"v.test\" = {{ level = \"verify\", ca_file = \"{ca}\" }}\n\
             \"nv.test\" = \"verify\"\n\
             \"sm.test\" = {{ level = \"secure\", ca_file = \"{ca}\", match = [\"peer.test\"] }}\n\
             \"s.test\" = {{ level = \"secure\", ca_file = \"{ca}\", match = [\"other.test\"] }}\n\
             \"e.test\" = \"encrypt\"\n"
        ),
    );
    inst.start();
    send_to_carols(&inst, &domains, "levels");
    let reply_of = |who: &str| queued_reply(&inst, who);
    wait_for(
        "three deliveries and two deferrals",
        Duration::from_secs(30),
        || {
            peer.count_new("carol") == 3
                && reply_of("carol@nv.test").is_some()
                && reply_of("carol@s.test").is_some()
        },
    );
    let delivered: Vec<String> = peer.read_maildir("carol");
    for d in ["v.test", "sm.test", "e.test"] {
        assert!(
            delivered
                .iter()
                .any(|m| m.contains(&format!("for <carol@{d}>"))),
            "{d} delivered"
        );
    }
    let nv = reply_of("carol@nv.test").unwrap();
    assert!(
        nv.contains("4.7.5 TLS level verify") && nv.contains("not verified"),
        "{nv}"
    );
    let s = reply_of("carol@s.test").unwrap();
    assert!(s.contains("4.7.5 TLS level secure"), "{s}");
    // The delivery line says what TLS the peer had, whose certificate, and whether checked.
    let log = inst.log();
    let line = |to: &str| {
        log.lines()
            .find(|l| l.contains(&format!("to={to} ")) && l.contains("status=sent"))
            .unwrap_or_else(|| panic!("no delivery of {to}: {log}"))
            .to_string()
    };
    let v = line("carol@v.test");
    assert!(
        v.contains("subject CN=peer.test, issuer CN=qms test CA, verified"),
        "{v}"
    );
    assert!(line("carol@e.test").contains("not verified"));
    // A certificate refused under one level says nothing of the host under another: mail
    // for v.test and e.test sent after those deferrals still goes, not "suspended".
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["carol@v.test", "carol@e.test"],
        "Subject: after\r\n\r\nx\r\n",
        "",
    );
    wait_for("two more deliveries", Duration::from_secs(30), || {
        peer.count_new("carol") == 5
    });
}
