//! Which hosts of a destination may be used, and how each one's certificate is checked:
//! DANE where the MX hosts have DNSSEC-signed TLSA records (levels `dane` and `dane-only`),
//! else the domain's MTA-STS policy, else the configured level. A host the policy does not
//! allow is left out; when none is left, the mail waits with the reasons (4.7.5).

use crate::dane::Tlsa;
use crate::peer::Peer;
use crate::tlsrpt::{Applied, Line};
use crate::{dns, sts, Dest, SmtpAgent, Target};
use hickory_resolver::proto::rr::{RData, RecordType};
use qms_common::config::TlsPolicy;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// How one host's certificate is treated.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum HostRule {
    /// As the destination's level says.
    Level,
    /// DANE: TLS required, the chain matched against these records.
    Dane(Arc<Vec<Tlsa>>),
    /// TLS required, any certificate: the host has TLSA records, none of them usable.
    Encrypt,
    /// MTA-STS `enforce`: TLS required, a trusted certificate naming the MX host.
    StsEnforce,
    /// MTA-STS `testing`: as the level says, the certificate checked and reported.
    StsTesting,
}

/// One address to try, with its host's name and rule.
pub(crate) struct Hop {
    pub(crate) name: String,
    pub(crate) peer: Peer,
    pub(crate) rule: HostRule,
}

/// A host's TLSA records: those qms can use, and all of them as text (for the report).
type Published = (Vec<Tlsa>, Vec<String>);

/// Where a destination's mail may go now, and the policy that said so.
pub(crate) struct Route {
    pub(crate) hops: Vec<Hop>,
    pub(crate) applied: Applied,
}

impl SmtpAgent {
    /// The hosts to try for a destination, and the port.
    fn hosts(&self, dest: &Dest) -> (dns::Lookup, u16) {
        let dns = match &self.dns {
            Ok(d) => d,
            Err(e) => return (dns::Lookup::Temporary(e.clone()), 25),
        };
        match &dest.target {
            Target::Smarthost(qms_spool::Smarthost { host, port, .. })
            | Target::Relay { host, port }
            | Target::Lmtp { host, port } => {
                let lookup = match host.parse::<IpAddr>() {
                    Ok(ip) => dns::Lookup::Hosts(vec![dns::Host {
                        name: host.clone(),
                        addrs: vec![ip],
                    }]),
                    Err(_) => dns.host(host),
                };
                (lookup, *port)
            }
            Target::Mx { domain } => (dns.mail_hosts(domain), self.cfg.client.port),
            Target::LmtpUnix { .. } => (dns::Lookup::Hosts(Vec::new()), 0),
        }
    }

    /// Where to connect for a destination, in order: a post office's socket, or each
    /// address of each host the TLS policy allows; else why none.
    pub(crate) fn route(&self, dest: &Dest) -> Result<Route, dns::Lookup> {
        if let Target::LmtpUnix { path } = &dest.target {
            return Ok(Route {
                hops: vec![Hop {
                    name: "localhost".into(),
                    peer: Peer::Unix(path.clone()),
                    rule: HostRule::Level,
                }],
                applied: Applied::default(),
            });
        }
        let (hosts, port) = match self.hosts(dest) {
            (dns::Lookup::Hosts(h), port) => (h, port),
            (failed, _) => return Err(failed),
        };
        let (domain, mx) = match &dest.target {
            Target::Mx { domain } => (domain.as_str(), true),
            Target::Relay { host, .. } => (host.as_str(), false),
            _ => ("", false),
        };
        let level = dest.tls.level;
        let mut rules: Vec<Option<HostRule>> = vec![Some(HostRule::Level); hosts.len()];
        let mut refused = Vec::new();
        let mut applied = Applied::default();
        if level.dane() && !domain.is_empty() {
            applied = self.dane(domain, mx, &hosts, port, &mut rules, &mut refused);
        }
        let sts_level = matches!(level, TlsPolicy::May | TlsPolicy::Encrypt | TlsPolicy::Dane);
        if applied.kind.is_empty() && mx && sts_level && self.cfg.client.mta_sts {
            applied = self.sts(domain, &hosts, &mut rules, &mut refused);
        }
        if level == TlsPolicy::DaneOnly {
            for (rule, h) in rules.iter_mut().zip(&hosts) {
                if *rule == Some(HostRule::Level) {
                    *rule = None;
                    refused.push(format!(
                        "TLS level dane-only: {} has no DNSSEC-signed TLSA records",
                        h.name
                    ));
                }
            }
        }
        let hops: Vec<Hop> = hosts
            .iter()
            .zip(rules)
            .filter_map(|(h, rule)| Some((h, rule?)))
            .flat_map(|(h, rule)| {
                h.addrs.iter().map(move |ip| Hop {
                    name: h.name.clone(),
                    peer: Peer::Inet(SocketAddr::new(*ip, port)),
                    rule: rule.clone(),
                })
            })
            .collect();
        if hops.is_empty() && !refused.is_empty() {
            return Err(dns::Lookup::Policy(refused.join("; ")));
        }
        Ok(Route { hops, applied })
    }

    /// RFC 7672 2.2: TLSA records count only under a signed MX RRset (or a relay host named
    /// in the configuration) and a signed address record of the host.
    fn dane(
        &self,
        domain: &str,
        mx: bool,
        hosts: &[dns::Host],
        port: u16,
        rules: &mut [Option<HostRule>],
        refused: &mut Vec<String>,
    ) -> Applied {
        let mut applied = Applied {
            kind: "tlsa".into(),
            domain: domain.to_string(),
            ..Applied::default()
        };
        let signed_mx = !mx
            || self
                .resolver
                .ask(domain, RecordType::MX)
                .is_ok_and(|a| a.secure);
        if !signed_mx {
            return Applied::default();
        }
        let mut found = false;
        for (i, h) in hosts.iter().enumerate() {
            match self.tlsa(&h.name, port) {
                Ok(None) => {}
                Ok(Some((records, strings))) => {
                    found = true;
                    applied.strings.extend(strings);
                    rules[i] = Some(if records.is_empty() {
                        HostRule::Encrypt
                    } else {
                        HostRule::Dane(Arc::new(records))
                    });
                }
                Err(e) => {
                    // RFC 7672 2.2.1: a lookup that fails (a failed validation among them)
                    // makes the host unusable for now, never a reason to go without DANE.
                    found = true;
                    rules[i] = None;
                    self.reports.record(Line {
                        time: qms_common::time::now(),
                        policy: applied.clone(),
                        result: "dnssec-invalid".into(),
                        mx_host: h.name.clone(),
                        ip: String::new(),
                        detail: e.clone(),
                    });
                    refused.push(format!("TLS level dane: {e}"));
                }
            }
        }
        if found {
            applied
        } else {
            Applied::default()
        }
    }

    /// A host's usable TLSA records and their text; None when DANE does not apply to it
    /// (no signed address or no signed records).
    fn tlsa(&self, host: &str, port: u16) -> Result<Option<Published>, String> {
        let addr = self.resolver.ask(host, RecordType::A);
        let signed = match addr {
            Ok(a) if !a.records.is_empty() => a.secure,
            _ => {
                self.resolver
                    .ask(host, RecordType::AAAA)
                    .map_err(|e| format!("address lookup of {host} failed: {e}"))?
                    .secure
            }
        };
        if !signed {
            return Ok(None);
        }
        let name = format!("_{port}._tcp.{host}");
        let answer = self
            .resolver
            .ask(&name, RecordType::TLSA)
            .map_err(|e| format!("TLSA lookup of {name} failed: {e}"))?;
        if !answer.secure || answer.records.is_empty() {
            return Ok(None);
        }
        let mut records = Vec::new();
        let mut strings = Vec::new();
        for r in &answer.records {
            if let RData::TLSA(t) = r {
                let (u, s, m) = (
                    u8::from(t.cert_usage),
                    u8::from(t.selector),
                    u8::from(t.matching),
                );
                strings.push(format!("{u} {s} {m} {}", hex(&t.cert_data)));
                records.extend(Tlsa::usable(u, s, m, &t.cert_data));
            }
        }
        Ok(Some((records, strings)))
    }

    /// RFC 8461 4: the domain's MTA-STS policy, if it has one: in `enforce` mode only the
    /// MX hosts it lists are used.
    fn sts(
        &self,
        domain: &str,
        hosts: &[dns::Host],
        rules: &mut [Option<HostRule>],
        refused: &mut Vec<String>,
    ) -> Applied {
        let Ok(dns) = &self.dns else {
            return Applied::default();
        };
        let (policy, failure) = self.sts.policy(dns, domain);
        if let Some(sts::FetchError(e)) = failure {
            self.reports.record(Line {
                time: qms_common::time::now(),
                policy: Applied {
                    kind: if policy.is_some() {
                        "sts"
                    } else {
                        "no-policy-found"
                    }
                    .into(),
                    domain: domain.to_string(),
                    ..Applied::default()
                },
                result: "sts-policy-fetch-error".into(),
                mx_host: String::new(),
                ip: String::new(),
                detail: e,
            });
        }
        let Some(p) = policy else {
            return Applied::default();
        };
        let applied = Applied {
            kind: "sts".into(),
            domain: domain.to_string(),
            strings: p.text.clone(),
            mx: p.mx.clone(),
        };
        let enforce = p.mode == sts::Mode::Enforce;
        for (i, h) in hosts.iter().enumerate() {
            if p.allows(&h.name) {
                rules[i] = Some(if enforce {
                    HostRule::StsEnforce
                } else {
                    HostRule::StsTesting
                });
                continue;
            }
            self.reports.record(Line {
                time: qms_common::time::now(),
                policy: applied.clone(),
                result: "validation-failure".into(),
                mx_host: h.name.clone(),
                ip: String::new(),
                detail: "MX host not listed in the policy".into(),
            });
            if enforce {
                rules[i] = None;
                refused.push(format!(
                    "MTA-STS policy of {domain} does not list MX host {}",
                    h.name
                ));
            } else {
                rules[i] = Some(HostRule::StsTesting);
            }
        }
        applied
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
