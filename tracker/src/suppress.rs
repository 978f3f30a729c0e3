//! The suppression list: recipients tracked sending does not send to again. Filled by hand
//! (`qms suppress add`) and, as `[tracking] suppress` says, from the events the tracker
//! ingests: hard bounces with a lasting reason ("user unknown", "has moved") and complaints.

/// One suppressed recipient.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Suppressed {
    pub address: String,
    /// Why: a reason of the vocabulary ("user unknown", …), "complaint", or what an
    /// administrator wrote.
    pub reason: String,
    /// `auto` (from an event) or `manual`.
    pub source: String,
    /// The queue id of the message whose bounce or complaint put it here.
    pub qid: Option<String>,
    /// Unix seconds.
    pub time: i64,
}

/// Addresses compare without regard to case: the list is kept in lower case.
pub(crate) fn key(address: &str) -> String {
    address
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_lowercase()
}

/// Whether an event puts its recipient on the list, and with which reason: a hard failure
/// whose reason `auto` names, or a complaint when `auto` names "complaint".
pub(crate) fn auto_reason(ev: &qms_common::track::Event, auto: &[String]) -> Option<String> {
    let reason = match ev.event.as_str() {
        "failed" => ev.reason.clone()?,
        "complained" => "complaint".to_string(),
        _ => return None,
    };
    // A failure reported with a transient status is not a hard bounce.
    let soft = ev
        .reply
        .as_deref()
        .and_then(qms_common::reason::status_in)
        .is_some_and(|s| s.starts_with('4'));
    (!soft && auto.iter().any(|a| a.eq_ignore_ascii_case(&reason))).then_some(reason)
}

/// Logs what an automatic addition did; an error is logged, never fatal to the ingest.
pub(crate) fn added(ev: &qms_common::track::Event, why: &str, done: Result<bool, String>) {
    match done {
        Ok(true) => qms_common::qlog!(
            "qid={} to={} status=suppressed reason={}",
            ev.qid,
            ev.recipient,
            qms_common::log::quote(why)
        ),
        Ok(false) => {}
        Err(e) => qms_common::qlog!("status=error reason={}", qms_common::log::quote(&e)),
    }
}
