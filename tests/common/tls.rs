//! Certificates for the tests, made by openssl, and a peer qms that takes mail over TLS.

use super::*;

/// Runs openssl with `args` in `dir`; the test fails if it does.
pub fn openssl(args: &[&str], dir: &Path) {
    let ok = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "openssl {args:?}");
}

/// A self-signed certificate and key (cert.pem, key.pem) in `dir`.
pub fn make_cert(dir: &Path, cn: &str) {
    let subject = format!("/CN={cn}");
    openssl(
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &subject,
            "-keyout", "key.pem", "-out", "cert.pem",
        ],
        dir,
    );
}

/// A certificate authority (ca.pem) and a server certificate it signed (cert.pem, key.pem)
/// for `cn`, 127.0.0.1 and localhost: what a client that verifies can be made to trust.
pub fn make_ca_cert(dir: &Path, cn: &str) {
    make_ca_cert_with(dir, cn, &[]);
}

/// As `make_ca_cert`, the certificate also naming `more` hosts.
pub fn make_ca_cert_with(dir: &Path, cn: &str, more: &[&str]) {
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
            "/CN=qms test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        dir,
    );
    let subject = format!("/CN={cn}");
    openssl(
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", &subject, "-keyout", "key.pem",
            "-out", "req.csr",
        ],
        dir,
    );
    std::fs::write(
        dir.join("san.ext"),
        format!(
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:{cn}{}\n",
            more.iter().map(|n| format!(",DNS:{n}")).collect::<String>()
        ),
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "req.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "cert.pem",
        ],
        dir,
    );
}

/// A peer qms taking mail for `domains` into carol's Maildir over TLS, with a certificate
/// from a test CA naming `names`, served with the CA's certificate after it (as DANE-TA
/// needs).
pub fn tls_peer(domains: &[&str], names: &[&str]) -> Instance {
    let mut peer = Instance::new("", "[tls]\ncert = \"chain.pem\"\nkey = \"key.pem\"\n");
    peer.carol_at(domains);
    make_ca_cert_with(&peer.dir, names[0], &names[1..]);
    let chain = [
        std::fs::read(peer.dir.join("cert.pem")).unwrap(),
        std::fs::read(peer.dir.join("ca.pem")).unwrap(),
    ]
    .concat();
    std::fs::write(peer.dir.join("chain.pem"), chain).unwrap();
    peer.own();
    peer.start();
    peer
}

/// Sends one message from alice@example.test to carol at each of `domains` (the mailboxes
/// `tls_peer` makes).
pub fn send_to_carols(inst: &Instance, domains: &[&str], subject: &str) {
    let to: Vec<String> = domains.iter().map(|d| format!("carol@{d}")).collect();
    let to: Vec<&str> = to.iter().map(String::as_str).collect();
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &to,
        &format!("Subject: {subject}\r\n\r\nx\r\n"),
        "",
    );
}
