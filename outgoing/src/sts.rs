//! MTA-STS (RFC 8461): a domain that publishes `_mta-sts.DOMAIN` TXT serves its policy at
//! `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`; in `enforce` mode only the MX hosts the
//! policy names are used, each over TLS with a certificate that public roots (or `[outgoing]
//! ca_file`) vouch for and that names the MX host. Policies are cached by id and max_age in
//! `tls/mta-sts/` of the spool, so a restart or an unreachable policy server changes
//! nothing before the policy expires.

use crate::dns::Dns;
use mail_auth::common::parse::TxtRecordParser;
use qms_common::qlog;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// RFC 8461 3.2: at most a year.
const MAX_AGE_LIMIT: i64 = 31_557_600;
/// A policy file is small; more than this is not a policy.
const MAX_POLICY_BYTES: u64 = 64 * 1024;
/// After a failed fetch, the domain's policy server is left alone this long (seconds), so
/// a dead server does not hold every delivery there for the fetch's time-out.
const FETCH_RETRY: i64 = 300;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    Enforce,
    Testing,
    None,
}

/// A domain's policy as fetched, with the id it was announced under.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Policy {
    pub(crate) id: String,
    pub(crate) mode: Mode,
    pub(crate) mx: Vec<String>,
    pub(crate) max_age: i64,
    /// When it was fetched (seconds since the epoch).
    pub(crate) fetched: i64,
    /// The policy's lines, as a TLS report quotes them.
    pub(crate) text: Vec<String>,
}

impl Policy {
    /// Parses a policy file (RFC 8461 3.2).
    pub(crate) fn parse(id: &str, body: &str, now: i64) -> Result<Policy, String> {
        let (mut version, mut mode, mut max_age, mut mx) = (None, None, None, Vec::new());
        let mut text = Vec::new();
        for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
            text.push(line.to_string());
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            match (k.trim(), v.trim()) {
                ("version", v) => version = Some(v.to_string()),
                ("mode", "enforce") => mode = Some(Mode::Enforce),
                ("mode", "testing") => mode = Some(Mode::Testing),
                ("mode", "none") => mode = Some(Mode::None),
                ("mode", m) => return Err(format!("unknown mode {m:?}")),
                ("max_age", n) => max_age = n.parse::<i64>().ok(),
                ("mx", m) => mx.push(m.to_ascii_lowercase()),
                _ => {}
            }
        }
        if version.as_deref() != Some("STSv1") {
            return Err("not an STSv1 policy".into());
        }
        let mode = mode.ok_or("the policy has no mode")?;
        let max_age = max_age.ok_or("the policy has no valid max_age")?;
        if mode != Mode::None && mx.is_empty() {
            return Err("the policy names no mx".into());
        }
        Ok(Policy {
            id: id.to_string(),
            mode,
            mx,
            max_age: max_age.clamp(0, MAX_AGE_LIMIT),
            fetched: now,
            text,
        })
    }

    fn expired(&self, now: i64) -> bool {
        now >= self.fetched + self.max_age
    }

    /// Whether `host` is one the policy allows: an exact name, or `*.` and one more label.
    pub(crate) fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(parent) => host
                .strip_suffix(parent)
                .and_then(|h| h.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            None => *p == host,
        })
    }
}

/// Why a domain's policy could not be had, for TLS reporting.
pub(crate) struct FetchError(pub(crate) String);

/// Policies by domain: in memory, and on disk under the spool.
pub(crate) struct Cache {
    dir: PathBuf,
    port: u16,
    ca_file: Option<PathBuf>,
    memory: Mutex<HashMap<String, Policy>>,
    /// When a domain's last fetch failed.
    failed: Mutex<HashMap<String, i64>>,
}

impl Cache {
    pub(crate) fn new(spool: &Path, port: u16, ca_file: Option<PathBuf>) -> Cache {
        Cache {
            dir: spool.join("tls/mta-sts"),
            port,
            ca_file,
            memory: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
        }
    }

    /// The policy in force for `domain`, if any (mode `none` counts as none), and a fetch
    /// that failed on the way.
    pub(crate) fn policy(&self, dns: &Dns, domain: &str) -> (Option<Policy>, Option<FetchError>) {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let now = qms_common::time::now();
        let cached = self.cached(&domain).filter(|p| !p.expired(now));
        // RFC 8461 3.1: exactly one `v=STSv1` record announces a policy and its id.
        let announced = match dns.txt(&format!("_mta-sts.{domain}")) {
            Ok(records) => {
                let ids: Vec<String> = records
                    .iter()
                    .filter(|r| r.starts_with("v=STSv1"))
                    .filter_map(|r| mail_auth::mta_sts::MtaSts::parse(r.as_bytes()).ok())
                    .map(|r| r.id)
                    .collect();
                (ids.len() == 1).then(|| ids[0].clone())
            }
            // No answer now: a cached policy stands (RFC 8461 5.1).
            Err(_) => None,
        };
        let (policy, failure) = match (announced, cached) {
            (None, cached) => (cached, None),
            (Some(id), Some(c)) if c.id == id => (Some(c), None),
            (Some(_), cached) if self.resting(&domain, now) => (cached, None),
            (Some(id), cached) => match self.fetch(dns, &domain, &id, now) {
                Ok(p) => {
                    self.store(&domain, &p);
                    (Some(p), None)
                }
                Err(e) => {
                    if let Ok(mut f) = self.failed.lock() {
                        f.insert(domain.clone(), now);
                    }
                    qlog!(
                        "domain={domain} status=mta-sts-fetch-failed reason={}",
                        qms_common::log::quote(&e)
                    );
                    (cached, Some(FetchError(e)))
                }
            },
        };
        (policy.filter(|p| p.mode != Mode::None), failure)
    }

    /// Whether the domain's last fetch failed less than `FETCH_RETRY` ago.
    fn resting(&self, domain: &str, now: i64) -> bool {
        self.failed
            .lock()
            .ok()
            .and_then(|f| f.get(domain).copied())
            .is_some_and(|t| now - t < FETCH_RETRY)
    }

    fn cached(&self, domain: &str) -> Option<Policy> {
        if let Some(p) = self.memory.lock().ok()?.get(domain) {
            return Some(p.clone());
        }
        let text = std::fs::read(self.file(domain)?).ok()?;
        let p: Policy = serde_json::from_slice(&text).ok()?;
        if let Ok(mut m) = self.memory.lock() {
            m.insert(domain.to_string(), p.clone());
        }
        Some(p)
    }

    /// The cache file of a domain; None for a name that could leave the directory.
    fn file(&self, domain: &str) -> Option<PathBuf> {
        let ok = !domain.is_empty()
            && !domain.starts_with('.')
            && domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        ok.then(|| self.dir.join(format!("{domain}.json")))
    }

    fn store(&self, domain: &str, p: &Policy) {
        if let Ok(mut m) = self.memory.lock() {
            m.insert(domain.to_string(), p.clone());
        }
        let Some(path) = self.file(domain) else {
            return;
        };
        let written = std::fs::create_dir_all(&self.dir)
            .map_err(|e| e.to_string())
            .and_then(|_| serde_json::to_vec_pretty(p).map_err(|e| e.to_string()))
            .and_then(|json| {
                let tmp = self.dir.join(format!(".{domain}.{}", std::process::id()));
                qms_common::safeio::write_atomic(tmp, path, &json).map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            qlog!(
                "domain={domain} status=warning reason={}",
                qms_common::log::quote(&format!("MTA-STS policy not cached: {e}"))
            );
        }
    }

    /// GET the policy over HTTPS: certificate checked, no redirects, a bounded body.
    fn fetch(&self, dns: &Dns, domain: &str, id: &str, now: i64) -> Result<Policy, String> {
        let host = format!("mta-sts.{domain}");
        let addrs: Vec<SocketAddr> = dns
            .addresses(&host)
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .into_iter()
            .map(|ip| SocketAddr::new(ip, self.port))
            .collect();
        if addrs.is_empty() {
            return Err(format!("{host} has no address"));
        }
        let agent = https_agent(self.ca_file.as_deref(), Some(addrs));
        let port = if self.port == 443 {
            String::new()
        } else {
            format!(":{}", self.port)
        };
        let url = format!("https://{host}{port}/.well-known/mta-sts.txt");
        let mut resp = agent.get(&url).call().map_err(|e| format!("{url}: {e}"))?;
        if resp.status() != 200 {
            return Err(format!("{url}: HTTP status {}", resp.status()));
        }
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ctype.to_ascii_lowercase().starts_with("text/plain") {
            return Err(format!("{url}: content type {ctype:?}, not text/plain"));
        }
        let mut body = String::new();
        resp.body_mut()
            .as_reader()
            .take(MAX_POLICY_BYTES + 1)
            .read_to_string(&mut body)
            .map_err(|e| format!("{url}: {e}"))?;
        // A longer body is not cut to fit: it is not a policy.
        if body.len() as u64 > MAX_POLICY_BYTES {
            return Err(format!("{url}: more than {MAX_POLICY_BYTES} bytes"));
        }
        Policy::parse(id, &body, now).map_err(|e| format!("{url}: {e}"))
    }
}

/// An HTTPS client that trusts the system's roots and `ca_file`, follows no redirect and
/// gives up after a minute; it connects to `resolved` when given (found with qms's own
/// resolver), else asks the system's.
pub(crate) fn https_agent(
    ca_file: Option<&Path>,
    resolved: Option<Vec<SocketAddr>>,
) -> ureq::Agent {
    let roots: Vec<ureq::tls::Certificate<'static>> = qms_common::tls::trusted_certs(ca_file)
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
        .build();
    let config = ureq::Agent::config_builder()
        .tls_config(tls)
        .max_redirects(0)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .user_agent("qms")
        .build();
    let connector = ureq::unversioned::transport::DefaultConnector::new();
    match resolved {
        Some(addrs) => ureq::Agent::with_parts(config, connector, Fixed(addrs)),
        None => ureq::Agent::with_parts(
            config,
            connector,
            ureq::unversioned::resolver::DefaultResolver::default(),
        ),
    }
}

/// The addresses already found with qms's own resolver, so `[dns] server` holds for the
/// policy host too.
#[derive(Debug)]
struct Fixed(Vec<SocketAddr>);

impl ureq::unversioned::resolver::Resolver for Fixed {
    fn resolve(
        &self,
        _: &ureq::http::Uri,
        _: &ureq::config::Config,
        _: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let mut out = self.empty();
        for a in self.0.iter().take(16) {
            out.push(*a);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_policy_and_matches_mx_patterns() {
        let p = Policy::parse(
            "1",
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n",
            100,
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert!(p.allows("mail.example.com") && p.allows("MX1.example.net."));
        assert!(!p.allows("example.net") && !p.allows("a.b.example.net"));
        assert!(!p.allows("mail.example.org"));
        assert!(!p.expired(100 + 86399) && p.expired(100 + 86400));
        assert!(Policy::parse("1", "version: STSv1\nmode: enforce\nmax_age: 1\n", 0).is_err());
        assert!(Policy::parse("1", "mode: enforce\nmx: a\nmax_age: 1\n", 0).is_err());
    }
}
