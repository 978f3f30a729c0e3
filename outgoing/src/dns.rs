//! Where mail for a domain goes: MX records in preference order (equal preferences shuffled),
//! RFC 7505 null MX as a permanent failure, and the domain's own address when it has no MX.
//! hickory-resolver is async; a current-thread runtime stays inside this module.

use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::Resolver;
use std::net::{IpAddr, SocketAddr};

pub struct Dns {
    rt: tokio::runtime::Runtime,
    resolver: Resolver<TokioRuntimeProvider>,
}

/// A host to try, with the addresses it resolved to.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub addrs: Vec<IpAddr>,
}

#[derive(Debug)]
pub enum Lookup {
    Hosts(Vec<Host>),
    /// The domain says it takes no mail (null MX) or does not exist.
    Permanent(String),
    /// Try again later (server failure, time-out).
    Temporary(String),
    /// Hosts were found, but the TLS policy (DANE, MTA-STS) allows none of them now.
    Policy(String),
}

impl Dns {
    pub fn new(server: Option<SocketAddr>) -> Result<Dns, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let provider = TokioRuntimeProvider::default();
        let resolver = match server {
            Some(addr) => {
                Resolver::builder_with_config(qms_common::dns::server_config(addr), provider)
                    .build()
            }
            None => Resolver::builder(provider).and_then(|b| b.build()),
        }
        .map_err(|e| format!("cannot set up DNS: {e}"))?;
        Ok(Dns { rt, resolver })
    }

    pub(crate) fn addresses(
        &self,
        name: &str,
    ) -> Result<Vec<IpAddr>, hickory_resolver::net::NetError> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        self.rt
            .block_on(self.resolver.lookup_ip(fqdn))
            .map(|l| l.iter().collect())
    }

    /// The TXT records of `name`, each record's strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2).
    pub fn txt(&self, name: &str) -> Result<Vec<String>, String> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.rt.block_on(self.resolver.txt_lookup(fqdn)) {
            Ok(l) => Ok(l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(t) => Some(
                        t.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(format!("TXT lookup of {name} failed: {e}")),
        }
    }

    /// A named next hop (`smtp:[relay.example.net]`): its addresses, no MX lookup.
    pub fn host(&self, name: &str) -> Lookup {
        match self.addresses(name) {
            Ok(a) if !a.is_empty() => Lookup::Hosts(vec![Host {
                name: name.to_string(),
                addrs: a,
            }]),
            Ok(_) => Lookup::Temporary(format!("{name} has no address")),
            Err(e) if e.is_nx_domain() => {
                Lookup::Permanent(format!("Host or domain name not found: {name}"))
            }
            Err(e) => {
                Lookup::Temporary(format!("Host or domain name lookup failed for {name}: {e}"))
            }
        }
    }

    /// The hosts that take mail for `domain`, best first.
    pub fn mail_hosts(&self, domain: &str) -> Lookup {
        // An address literal: deliver there, no lookup.
        if let Some(lit) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
            let ip = lit.strip_prefix("IPv6:").unwrap_or(lit);
            return match ip.parse::<IpAddr>() {
                Ok(ip) => Lookup::Hosts(vec![Host {
                    name: domain.to_string(),
                    addrs: vec![ip],
                }]),
                Err(_) => Lookup::Permanent(format!("bad address literal {domain}")),
            };
        }
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let mx = self.rt.block_on(self.resolver.mx_lookup(fqdn));
        let mut records: Vec<(u16, String)> = match mx {
            Ok(l) => l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => Some((
                        mx.preference,
                        mx.exchange.to_utf8().trim_end_matches('.').to_string(),
                    )),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_nx_domain() => {
                return Lookup::Permanent(format!(
                    "Host or domain name not found: {domain} (NXDOMAIN)"
                ))
            }
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => {
                return Lookup::Temporary(format!(
                    "Host or domain name lookup failed for {domain}: {e}"
                ))
            }
        };
        if records.len() == 1 && records[0].1.is_empty() {
            return Lookup::Permanent(format!("{domain} does not accept mail (null MX, RFC 7505)"));
        }
        if records.is_empty() {
            // No MX: the domain itself is the mail host (RFC 5321 5.1).
            return match self.addresses(domain) {
                Ok(a) if !a.is_empty() => Lookup::Hosts(vec![Host {
                    name: domain.to_string(),
                    addrs: a,
                }]),
                Ok(_) => Lookup::Permanent(format!("no mail host for {domain}")),
                Err(e) if e.is_nx_domain() || e.is_no_records_found() => {
                    Lookup::Permanent(format!("no mail host for {domain}"))
                }
                Err(e) => Lookup::Temporary(format!(
                    "Host or domain name lookup failed for {domain}: {e}"
                )),
            };
        }
        shuffle_equal(&mut records);
        let mut hosts = Vec::new();
        let mut last_err = None;
        for (_, name) in records.into_iter().filter(|(_, n)| !n.is_empty()) {
            match self.addresses(&name) {
                Ok(a) if !a.is_empty() => hosts.push(Host { name, addrs: a }),
                Ok(_) => {}
                Err(e) => last_err = Some(format!("lookup of MX host {name} failed: {e}")),
            }
        }
        match (hosts.is_empty(), last_err) {
            (false, _) => Lookup::Hosts(hosts),
            (true, Some(e)) => Lookup::Temporary(e),
            (true, None) => Lookup::Temporary(format!("no MX host of {domain} has an address")),
        }
    }
}

/// Sorts by preference and shuffles hosts of equal preference (RFC 5321 5.1).
fn shuffle_equal(records: &mut [(u16, String)]) {
    let mut seed = qms_common::time::now_micros() | 1;
    records.sort_by_key(|(p, _)| *p);
    let mut i = 0;
    while i < records.len() {
        let j = records[i..]
            .iter()
            .position(|(p, _)| *p != records[i].0)
            .map_or(records.len(), |k| i + k);
        for k in (i + 1..j).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let r = i + (seed as usize) % (k - i + 1);
            records.swap(k, r);
        }
        i = j;
    }
}
