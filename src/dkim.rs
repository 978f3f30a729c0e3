//! `qms dkim keygen` and `qms dkim check`: the keys `[dkim]` signs with, and the DNS
//! records that publish them (the signing itself is the router's, `router/src/dkim.rs`).

use base64::Engine;
use clap::Subcommand;
use mail_auth::common::crypto::DkimKey;
use mail_auth::dkim::generate::DkimKeyPair;
use qms_common::Config;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum DkimCmd {
    /// Make a signing key (RSA-2048, or Ed25519) and print the DNS record that publishes it.
    Keygen {
        domain: String,
        selector: String,
        /// Where the private key goes (PEM, mode 0600); an existing file is never replaced.
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        ed25519: bool,
    },
    /// Look up the DNS record of every selector of DOMAIN and say whether it matches the key.
    Check { domain: String },
}

pub fn run(cfg: &Config, cmd: DkimCmd) -> ExitCode {
    match cmd {
        DkimCmd::Keygen {
            domain,
            selector,
            out,
            ed25519,
        } => keygen(cfg, &domain, &selector, &out, ed25519),
        DkimCmd::Check { domain } => check(cfg, &domain),
    }
}

fn keygen(cfg: &Config, domain: &str, selector: &str, out: &Path, ed25519: bool) -> ExitCode {
    let made = if ed25519 {
        DkimKeyPair::generate_ed25519()
    } else {
        DkimKeyPair::generate_rsa(2048)
    };
    let pair = match made {
        Ok(p) => p,
        Err(e) => {
            eprintln!("qms: cannot make a key: {e}");
            return ExitCode::from(70);
        }
    };
    let (label, public) = if ed25519 {
        ("PRIVATE KEY", pair.public_key().to_vec())
    } else {
        ("RSA PRIVATE KEY", spki_of_rsa(pair.public_key()))
    };
    let private = if ed25519 {
        match pkcs8_v1(pair.private_key()) {
            Some(k) => k,
            None => {
                eprintln!("qms: the Ed25519 key came in an unknown form");
                return ExitCode::from(70);
            }
        }
    } else {
        pair.private_key().to_vec()
    };
    if let Err(e) = write_key(cfg, out, &pem(label, &private)) {
        eprintln!("qms: {}: {e}", out.display());
        return ExitCode::from(73);
    }
    let kind = if ed25519 { "ed25519" } else { "rsa" };
    println!("{}", record(domain, selector, kind, &public));
    ExitCode::SUCCESS
}

/// Creates the key file, never over an existing one, mode 0600, owned by the mail system's
/// user when run as root (the router reads it as that user).
fn write_key(cfg: &Config, path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    if nix::unistd::geteuid().is_root() {
        if let Some(user) = cfg.user.as_deref() {
            let a = qms_common::privs::Account::lookup(user).map_err(std::io::Error::other)?;
            nix::unistd::fchown(&f, Some(a.uid), Some(a.gid)).map_err(std::io::Error::from)?;
        }
    }
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// ring's Ed25519 PKCS#8 carries the public key too (RFC 5958 version 2), which OpenSSL does
/// not read; the key file gets the plain RFC 8410 form, the seed alone.
fn pkcs8_v1(v2: &[u8]) -> Option<Vec<u8>> {
    const V2: &[u8] = &[
        0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    const V1: &[u8] = &[
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let seed = v2.strip_prefix(V2)?.get(..32)?;
    Some([V1, seed].concat())
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// The TXT record in zone-file form; the key is cut into strings of at most 255 bytes, as
/// a TXT string must be.
fn record(domain: &str, selector: &str, kind: &str, public: &[u8]) -> String {
    let text = format!(
        "v=DKIM1; k={kind}; p={}",
        base64::engine::general_purpose::STANDARD.encode(public)
    );
    let parts: Vec<String> = text
        .as_bytes()
        .chunks(250)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!(
        "{selector}._domainkey.{domain}. IN TXT ( {} )",
        parts.join(" ")
    )
}

/// An RSAPublicKey (PKCS#1) inside a SubjectPublicKeyInfo, the form DKIM records carry
/// (what `openssl rsa -pubout` and opendkim-genkey publish).
fn spki_of_rsa(pkcs1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier: rsaEncryption (1.2.840.113549.1.1.1), NULL parameters.
    const ALG: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0u8];
    bits.extend_from_slice(pkcs1);
    let mut body = ALG.to_vec();
    body.extend(der(0x03, &bits));
    der(0x30, &body)
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let len: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | len.len() as u8);
        out.extend(len);
    }
    out.extend_from_slice(content);
    out
}

/// The public key a record should publish for the key in `path`: SPKI for RSA, the raw 32
/// bytes for Ed25519.
fn public_of(path: &Path) -> Result<(&'static str, Vec<u8>), String> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
    match qms_router::dkim::read_key(path)? {
        DkimKey::Ed25519(k) => Ok(("ed25519", k.public_key())),
        DkimKey::Rsa(_) => {
            let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
            let key = rsa::RsaPrivateKey::from_pkcs1_pem(&text)
                .or_else(|_| rsa::RsaPrivateKey::from_pkcs8_pem(&text))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let spki = key
                .to_public_key()
                .to_public_key_der()
                .map_err(|e| e.to_string())?;
            Ok(("rsa", spki.as_bytes().to_vec()))
        }
    }
}

fn check(cfg: &Config, domain: &str) -> ExitCode {
    let domain = domain.to_ascii_lowercase();
    let Some(selectors) = cfg.dkim.get(&domain) else {
        eprintln!("qms: no [dkim.\"{domain}\"] in {}", cfg.path.display());
        return ExitCode::from(64);
    };
    let dns = match qms_outgoing::dns::Dns::new(cfg.client.dns_server) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("qms: {e}");
            return ExitCode::from(69);
        }
    };
    let mut ok = true;
    for s in selectors {
        let name = format!("{}._domainkey.{domain}", s.selector);
        let verdict = match (public_of(&s.key), dns.txt(&name)) {
            (Err(e), _) => Err(e),
            (_, Err(e)) => Err(e),
            (Ok((kind, ours)), Ok(records)) => judge(kind, &ours, &records),
        };
        match verdict {
            Ok(()) => println!(
                "{name}: ok, the record publishes the key in {}",
                s.key.display()
            ),
            Err(why) => {
                ok = false;
                println!("{name}: WRONG: {why}");
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Whether one of `records` is a DKIM key record publishing `ours`.
fn judge(kind: &str, ours: &[u8], records: &[String]) -> Result<(), String> {
    let keys: Vec<&String> = records.iter().filter(|r| r.contains("p=")).collect();
    if keys.is_empty() {
        return Err("no DKIM key record".into());
    }
    for r in keys {
        let tag = |t: &str| {
            r.split(';')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| k.trim() == t)
                .map(|(_, v)| v.split_whitespace().collect::<String>())
        };
        let published = tag("p").unwrap_or_default();
        let k = tag("k").unwrap_or_else(|| "rsa".into());
        let Ok(theirs) = base64::engine::general_purpose::STANDARD.decode(&published) else {
            continue;
        };
        // An RSA key may be published bare (PKCS#1) as well as in an SPKI.
        let same = theirs == ours || (kind == "rsa" && spki_of_rsa(&theirs) == ours);
        if k == kind && same {
            return Ok(());
        }
    }
    Err(format!(
        "the record does not publish this {kind} key; it says {:?}, and should say \"v=DKIM1; k={kind}; p={}\"",
        records.join(" | "),
        base64::engine::general_purpose::STANDARD.encode(ours)
    ))
}
