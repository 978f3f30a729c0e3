//! Tracked sending (X822-MSP, the MARMEE mail submission pipeline): `BX-` header fields are
//! local requests, acted on and stripped here; `X-B-` fields are global, acted on and kept.
//! Only trusted submitters (authenticated, local `sendmail`, `mynetworks`) may use them; from
//! anyone else every such field is removed, and the removal logged.
//!
//! The values, as qms reads them (the seed names the fields, not their syntax):
//! - `X-B-Envelope-Addr: ADDR` sets the envelope sender.
//! - `BX-Delivery-Notification-Req-To: ADDR` and `BX-Non-Delivery-Notification-Req-To: ADDR`
//!   name where reports go; reports go to the envelope sender, so without `X-B-Envelope-Addr`
//!   the non-delivery address (else the delivery one) becomes the envelope sender.
//! - `…-Req-For: ADDR, ADDR` lists the recipients a request covers (absent or `all`: all).
//!   Delivery requests add NOTIFY=SUCCESS, non-delivery requests NOTIFY=FAILURE,DELAY.
//!   `…-Req-PerRecipient: yes|no` is accepted (reports are per recipient in any case).
//! - A request also sets ENVID (to `X-B-CrossRef`, else the Message-ID) and RET=HDRS unless
//!   the client gave them.
//! - `BX-Disposition-Notification-Req-To: ADDR` adds `Disposition-Notification-To:` and
//!   `Return-Receipt-To:` (RFC 8098).
//! - `X-B-CrossRef` and `X-B-Non-Delivery-Notification-Actions` are stored in the job.
//! - `BX-Sending-Method: inject|submit` is noted; `BX-Sending-Run-Control: dryrun` routes,
//!   logs and tracks but delivers nothing.
//! - The smarthost (`BX-MTA-Rem-*`) and plugin (`BX-MTA-Submission-*-Plugins`) fields are not
//!   acted on yet: they are stripped and named in the log, their values never.

use qms_common::headers;
use qms_common::log::quote;
use qms_common::{qlog, Address};
use qms_spool::{DsnRet, Job, Notify};

fn is_msp(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.starts_with("bx-") || n.starts_with("x-b-")
}

fn addresses(v: &str) -> Vec<Address> {
    v.split([',', ' ', ';'])
        .filter_map(|a| Address::parse(a.trim().trim_start_matches('<').trim_end_matches('>')).ok())
        .collect()
}

/// Applies the tracked-sending fields of `msg` to `job`. Returns the rewritten message when
/// fields were stripped or added, None when the message stays as it is.
pub fn apply(job: &mut Job, msg: &[u8]) -> Option<Vec<u8>> {
    let fields: Vec<(String, String)> = headers::named_fields(msg)
        .into_iter()
        .filter(|(n, _)| is_msp(n))
        .collect();
    if fields.is_empty() {
        return None;
    }
    let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
    if !job.client.trusted {
        qlog!(
            "qid={} status=msp-removed reason=\"untrusted submitter\" headers={}",
            job.id,
            quote(&names.join(","))
        );
        let mut out = msg.to_vec();
        for n in &names {
            out = headers::remove(&out, n);
        }
        return Some(out);
    }
    let get = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    let mut added = String::new();
    let mut sender = get("X-B-Envelope-Addr").and_then(|v| addresses(&v).into_iter().next());
    let nd_to =
        get("BX-Non-Delivery-Notification-Req-To").and_then(|v| addresses(&v).into_iter().next());
    let d_to =
        get("BX-Delivery-Notification-Req-To").and_then(|v| addresses(&v).into_iter().next());
    if sender.is_none() {
        sender = nd_to.clone().or(d_to.clone());
    }
    let mut requested = false;
    for (prefix, flags) in [
        ("BX-Delivery-Notification", &[Notify::Success][..]),
        (
            "BX-Non-Delivery-Notification",
            &[Notify::Failure, Notify::Delay][..],
        ),
    ] {
        let present = fields.iter().any(|(n, _)| {
            n.len() >= prefix.len() && n[..prefix.len()].eq_ignore_ascii_case(prefix)
        });
        if !present {
            continue;
        }
        requested = true;
        let for_list = get(&format!("{prefix}-Req-For"))
            .filter(|v| !v.eq_ignore_ascii_case("all"))
            .map(|v| addresses(&v));
        for r in job.recipients.iter_mut() {
            let covered = for_list
                .as_ref()
                .is_none_or(|l| l.iter().any(|a| a.lookup_key() == r.address.lookup_key()));
            if covered {
                r.notify.retain(|n| *n != Notify::Never);
                for f in flags {
                    if !r.notify.contains(f) {
                        r.notify.push(*f);
                    }
                }
            }
        }
    }
    if let Some(to) =
        get("BX-Disposition-Notification-Req-To").and_then(|v| addresses(&v).into_iter().next())
    {
        if !headers::has(msg, "disposition-notification-to") {
            added.push_str(&format!("Disposition-Notification-To: <{to}>\r\n"));
        }
        if !headers::has(msg, "return-receipt-to") {
            added.push_str(&format!("Return-Receipt-To: <{to}>\r\n"));
        }
    }
    job.crossref = get("X-B-CrossRef");
    job.nd_actions = get("X-B-Non-Delivery-Notification-Actions")
        .map(|v| {
            v.split([',', ' '])
                .filter(|a| !a.is_empty())
                .map(|a| a.to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    job.dryrun = get("BX-Sending-Run-Control").is_some_and(|v| {
        v.to_ascii_lowercase()
            .split([',', ' '])
            .any(|w| w == "dryrun")
    });
    if requested {
        job.envid = job
            .envid
            .take()
            .or_else(|| job.crossref.clone())
            .or_else(|| job.message_id.clone());
        job.ret = job.ret.or(Some(DsnRet::Hdrs));
    }
    if let Some(s) = sender {
        job.sender = Some(s);
    }
    const KNOWN: [&str; 12] = [
        "bx-delivery-notification-req-to",
        "bx-delivery-notification-req-for",
        "bx-delivery-notification-req-perrecipient",
        "bx-non-delivery-notification-req-to",
        "bx-non-delivery-notification-req-for",
        "bx-non-delivery-notification-req-perrecipient",
        "bx-disposition-notification-req-to",
        "bx-disposition-notification-req-for",
        "bx-disposition-notification-req-perrecipient",
        "bx-sending-method",
        "bx-sending-run-control",
        "bx-delivery-notification",
    ];
    let stripped: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.to_ascii_lowercase().starts_with("bx-"))
        .collect();
    let ignored: Vec<&str> = stripped
        .iter()
        .copied()
        .filter(|n| !KNOWN.contains(&n.to_ascii_lowercase().as_str()))
        .collect();
    if !ignored.is_empty() {
        // Names only: these fields can carry credentials (BX-MTA-Rem-Passwd).
        qlog!(
            "qid={} status=msp-ignored reason=\"not supported; stripped\" headers={}",
            job.id,
            quote(&ignored.join(","))
        );
    }
    qlog!(
        "qid={} status=msp from={} crossref={} envid={} dryrun={} stripped={}",
        job.id,
        qms_common::address::show_sender(&job.sender),
        quote(job.crossref.as_deref().unwrap_or("-")),
        quote(job.envid.as_deref().unwrap_or("-")),
        job.dryrun,
        stripped.len()
    );
    let mut out = msg.to_vec();
    for n in &stripped {
        out = headers::remove(&out, n);
    }
    if !added.is_empty() {
        let mut with = added.into_bytes();
        with.extend_from_slice(&out);
        out = with;
    }
    Some(out)
}
