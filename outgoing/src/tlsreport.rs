//! TLS reporting (RFC 8460), the sending half: one day's counts (`tls/reports/DAY`) become
//! one aggregate report per policy domain, JSON compressed with gzip, sent to the `rua`
//! addresses of the domain's `_smtp._tls` TXT record: by mail (multipart/report, queued as
//! any message) or by HTTPS POST. A day sent is renamed `DAY.sent`.

use crate::tlsrpt::{Applied, Line, Recorder};
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::mta_sts::{ReportUri, TlsRpt};
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::{BodyPart, MimePart};
use mail_builder::MessageBuilder;
use qms_common::{qlog, Config};
use qms_spool::{Client, Job, Recipient, Spool};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;

/// The protocol reports are queued under.
pub const PROTOCOL: &str = "tlsrpt";

/// One policy domain's report for one day.
pub struct Report {
    pub domain: String,
    pub id: String,
    pub json: Value,
}

/// The reports of `day` (`YYYY-MM-DD`), from its counts; none when nothing was counted.
pub fn build(cfg: &Config, day: &str) -> Result<Vec<Report>, String> {
    let path = Recorder::day_file(&cfg.spool, day);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    // domain -> policy -> (successes, failures by (result, host, ip) -> (count, detail))
    type Failures = BTreeMap<(String, String, String), (u64, String)>;
    let mut by_domain: BTreeMap<String, BTreeMap<Applied, (u64, Failures)>> = BTreeMap::new();
    for line in text.lines() {
        let Ok(l) = serde_json::from_str::<Line>(line) else {
            continue;
        };
        let entry = by_domain
            .entry(l.policy.domain.clone())
            .or_default()
            .entry(l.policy.clone())
            .or_default();
        if l.result == "success" {
            entry.0 += 1;
        } else {
            let f = entry.1.entry((l.result, l.mx_host, l.ip)).or_default();
            f.0 += 1;
            f.1 = l.detail;
        }
    }
    let start = format!("{day}T00:00:00Z");
    let end = format!("{day}T23:59:59Z");
    Ok(by_domain
        .into_iter()
        .map(|(domain, policies)| {
            let id = format!("{start}_{domain}@{}", cfg.hostname);
            let policies: Vec<Value> = policies
                .into_iter()
                .map(|(p, (ok, failures))| policy_json(&p, ok, &failures))
                .collect();
            let json = json!({
                "organization-name": cfg.hostname,
                "date-range": { "start-datetime": start, "end-datetime": end },
                "contact-info": cfg.postmaster.to_string(),
                "report-id": id,
                "policies": policies,
            });
            Report { domain, id, json }
        })
        .collect())
}

fn policy_json(
    p: &Applied,
    ok: u64,
    failures: &BTreeMap<(String, String, String), (u64, String)>,
) -> Value {
    let mut policy = json!({
        "policy-type": p.kind,
        "policy-domain": p.domain,
    });
    if !p.strings.is_empty() {
        policy["policy-string"] = json!(p.strings);
    }
    if !p.mx.is_empty() {
        policy["mx-host"] = json!(p.mx);
    }
    let details: Vec<Value> = failures
        .iter()
        .map(|((result, host, ip), (n, detail))| {
            let mut d = json!({ "result-type": result, "failed-session-count": n });
            if !host.is_empty() {
                d["receiving-mx-hostname"] = json!(host);
            }
            if !ip.is_empty() {
                d["receiving-ip"] = json!(ip);
            }
            if !detail.is_empty() {
                d["failure-reason-code"] = json!(detail);
            }
            d
        })
        .collect();
    json!({
        "policy": policy,
        "summary": {
            "total-successful-session-count": ok,
            "total-failure-session-count": failures.values().map(|f| f.0).sum::<u64>(),
        },
        "failure-details": details,
    })
}

/// Where a domain wants its reports: the `rua` of its `_smtp._tls` TXT record.
pub fn destinations(dns: &crate::dns::Dns, domain: &str) -> Vec<ReportUri> {
    let records = dns.txt(&format!("_smtp._tls.{domain}")).unwrap_or_default();
    records
        .iter()
        .filter(|r| r.starts_with("v=TLSRPTv1"))
        .filter_map(|r| TlsRpt::parse(r.as_bytes()).ok())
        .flat_map(|r| r.rua)
        .collect()
}

/// The report compressed, as RFC 8460 5.2 sends it.
fn gzip(report: &Report) -> Result<Vec<u8>, String> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(report.json.to_string().as_bytes())
        .and_then(|_| enc.finish())
        .map_err(|e| format!("cannot compress the report: {e}"))
}

/// Sends one report to each of the domain's destinations; returns where it went.
fn send(
    cfg: &Config,
    spool: &Spool,
    dns: &crate::dns::Dns,
    report: &Report,
) -> Result<Vec<String>, String> {
    let gz = gzip(report)?;
    let mut sent = Vec::new();
    for to in destinations(dns, &report.domain) {
        let done = match &to {
            ReportUri::Mail(addr) => queue_mail(cfg, spool, report, addr, &gz),
            ReportUri::Http(url) => post(cfg, url, &gz),
        };
        let (ReportUri::Mail(where_to) | ReportUri::Http(where_to)) = &to;
        match done {
            Ok(()) => sent.push(where_to.clone()),
            Err(e) => qlog!(
                "domain={} status=tls-report-failed to={} reason={}",
                report.domain,
                qms_common::log::quote(where_to),
                qms_common::log::quote(&e)
            ),
        }
    }
    Ok(sent)
}

/// RFC 8460 5.3: a multipart/report of type tlsrpt, the JSON gzipped as an attachment.
fn queue_mail(
    cfg: &Config,
    spool: &Spool,
    report: &Report,
    to: &str,
    gz: &[u8],
) -> Result<(), String> {
    let address = qms_common::address::Address::parse(to)
        .map_err(|e| format!("bad rua address {to:?}: {e}"))?;
    let range = &report.json["date-range"];
    let stamp = |k: &str| {
        range[k]
            .as_str()
            .unwrap_or_default()
            .replace([':', '-'], "")
    };
    let file = format!(
        "{}!{}!{}!{}.json.gz",
        cfg.hostname,
        report.domain,
        stamp("start-datetime"),
        stamp("end-datetime")
    );
    let text = format!(
        "This is an aggregate TLS report (RFC 8460) from {} for {}.\r\n",
        cfg.hostname, report.domain
    );
    let parts = vec![
        MimePart::new("text/plain", text),
        MimePart::new(
            ContentType::new("application/tlsrpt+gzip").attribute("name", file.as_str()),
            BodyPart::Binary(gz.to_vec().into()),
        )
        .attachment(file.as_str()),
    ];
    let message = MessageBuilder::new()
        .from(("TLS reports", cfg.postmaster.to_string().as_str()))
        .to(to)
        // Raw: RFC 8460 5.3 gives the subject's form, which encoding would hide.
        .header(
            "Subject",
            Raw::new(format!(
                "Report Domain: {} Submitter: {} Report-ID: <{}>",
                report.domain, cfg.hostname, report.id
            )),
        )
        .header("TLS-Report-Domain", Raw::new(report.domain.as_str()))
        .header("TLS-Report-Submitter", Raw::new(cfg.hostname.as_str()))
        .header("Auto-Submitted", Raw::new("auto-generated"))
        .body(MimePart::new(
            ContentType::new("multipart/report").attribute("report-type", "tlsrpt"),
            parts,
        ))
        .write_to_vec()
        .map_err(|e| e.to_string())?;
    // The null sender: a report that cannot be delivered is not worth a bounce.
    let job = Job::new(
        "incoming",
        None,
        vec![Recipient::new(address.clone())],
        Client::default(),
        PROTOCOL,
        &cfg.outgoing,
    );
    let id = spool
        .enqueue(job, &|_| message.clone())
        .map_err(|e| format!("the report was not queued: {e}"))?;
    qlog!(
        "qid={id} domain={} status=tls-report-queued to={}",
        report.domain,
        qms_common::address::logged(&address)
    );
    Ok(())
}

/// RFC 8460 5.4: an HTTPS POST of the gzipped report.
fn post(cfg: &Config, url: &str, gz: &[u8]) -> Result<(), String> {
    if !url.starts_with("https://") {
        return Err(format!("{url}: reports are only sent over HTTPS"));
    }
    let agent = crate::sts::https_agent(cfg.client.ca_file.as_deref(), None);
    let resp = agent
        .post(url)
        .header("Content-Type", "application/tlsrpt+gzip")
        .send(gz)
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP status {}", resp.status()));
    }
    Ok(())
}

/// Sends every day before today that has counts and was not sent yet (`tlsrpt` role and
/// `qms tls-report --send`); returns the days done.
pub fn send_due(cfg: &Config, spool: &Spool, today: &str) -> Vec<String> {
    let dir = cfg.spool.join("tls/reports");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut days: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|d| d.len() == 10 && d.as_str() < today && !d.contains('.'))
        .collect();
    days.sort();
    days.into_iter()
        .filter(|day| send_day(cfg, spool, day).is_ok())
        .collect()
}

/// Sends one day's reports and marks the day sent.
pub fn send_day(cfg: &Config, spool: &Spool, day: &str) -> Result<usize, String> {
    let reports = build(cfg, day)?;
    let dns = crate::dns::Dns::new(cfg.client.dns_server)?;
    for r in &reports {
        let to = send(cfg, spool, &dns, r)?;
        qlog!(
            "domain={} status=tls-report day={day} sent_to={}",
            r.domain,
            qms_common::log::quote(&to.join(","))
        );
    }
    let from = Recorder::day_file(&cfg.spool, day);
    let done = from.with_file_name(format!("{day}.sent"));
    if from.exists() {
        std::fs::rename(&from, &done).map_err(|e| format!("cannot mark {day} sent: {e}"))?;
    }
    Ok(reports.len())
}
