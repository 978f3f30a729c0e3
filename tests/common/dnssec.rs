//! A validating resolver on a loopback port: Unbound serves a zone signed by `ldns-signzone`
//! with fresh keys, trusts its key, and marks its answers authenticated (AD); a second zone
//! is served unsigned, so its answers are insecure. All from Debian's packages.

use super::*;

pub struct SignedDns {
    child: Child,
    pub port: u16,
}

impl Drop for SignedDns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(dir: &Path, cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `signed` and `unsigned` are (zone name, records after the SOA and NS, one per line,
/// names relative to the zone).
pub fn signed_dns(dir: &Path, signed: (&str, &str), unsigned: (&str, &str)) -> SignedDns {
    let d = dir.join("dns");
    std::fs::create_dir_all(&d).unwrap();
    let zone = |name: &str, records: &str| {
        format!(
            "$ORIGIN {name}.\n$TTL 300\n@ IN SOA ns.{name}. admin.{name}. 1 3600 600 86400 300\n\
             @ IN NS ns.{name}.\nns IN A 127.0.0.1\n{records}\n"
        )
    };
    std::fs::write(d.join("signed.zone"), zone(signed.0, signed.1)).unwrap();
    std::fs::write(d.join("unsigned.zone"), zone(unsigned.0, unsigned.1)).unwrap();
    let ksk = run(
        &d,
        "ldns-keygen",
        &["-a", "ECDSAP256SHA256", "-k", signed.0],
    );
    let zsk = run(&d, "ldns-keygen", &["-a", "ECDSAP256SHA256", signed.0]);
    run(&d, "ldns-signzone", &["-n", "signed.zone", &ksk, &zsk]);
    let port = free_port();
    let conf = format!(
        "server:\n  interface: 127.0.0.1\n  port: {port}\n  do-ip6: no\n  do-not-query-localhost: no\n\
         \x20 username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  use-syslog: no\n\
         \x20 logfile: \"{d}/unbound.log\"\n  trust-anchor-file: \"{d}/{ksk}.ds\"\n\
         \x20 module-config: \"validator iterator\"\n  local-zone: \"test.\" nodefault\n\
         auth-zone:\n  name: \"{s}\"\n  zonefile: \"{d}/signed.zone.signed\"\n  for-upstream: yes\n\
         \x20 for-downstream: no\n  fallback-enabled: no\n\
         auth-zone:\n  name: \"{u}\"\n  zonefile: \"{d}/unsigned.zone\"\n  for-upstream: yes\n\
         \x20 for-downstream: no\n  fallback-enabled: no\n",
        d = d.display(),
        s = signed.0,
        u = unsigned.0,
    );
    std::fs::write(d.join("unbound.conf"), conf).unwrap();
    let child = Command::new("unbound")
        .args(["-d", "-c"])
        .arg(d.join("unbound.conf"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("unbound.err")).unwrap())
        .spawn()
        .expect("unbound");
    wait_for("unbound", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    SignedDns { child, port }
}

/// The hex SHA-256 of a certificate's public key (TLSA selector 1, matching 1).
pub fn spki_sha256(cert: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -in '{}' -noout -pubkey | openssl pkey -pubin -outform DER | openssl dgst -sha256 -r",
            cert.display()
        ))
        .output()
        .unwrap();
    first_word(&out.stdout)
}

/// The hex SHA-256 of a whole certificate (TLSA selector 0, matching 1).
pub fn cert_sha256(cert: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -in '{}' -outform DER | openssl dgst -sha256 -r",
            cert.display()
        ))
        .output()
        .unwrap();
    first_word(&out.stdout)
}

fn first_word(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let w = s.split_whitespace().next().unwrap_or("").to_string();
    assert_eq!(w.len(), 64, "a SHA-256 in hex: {s}");
    w
}
