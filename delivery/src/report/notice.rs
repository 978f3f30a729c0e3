//! Provider notifications sent as mail with a JSON body: Amazon SES's bounce, complaint and
//! delivery notifications (as SNS mails them), documented by AWS as "Amazon SES notification
//! contents".

use super::{RcptReport, ReportKind};
use serde_json::Value;

pub struct Notice {
    pub kind: ReportKind,
    pub recipients: Vec<RcptReport>,
    pub feedback_type: Option<String>,
}

/// The notification in a text body, if it is one.
pub fn provider(text: &str) -> Option<Notice> {
    let t = text.trim_start();
    if !t.starts_with('{') {
        return None;
    }
    let end = t.rfind('}')?;
    let json = &t[..=end];
    // Mailers that fold lines longer than 998 octets leave "!\n " in the middle of a value.
    let v: Value = serde_json::from_str(json)
        .or_else(|_| serde_json::from_str(&json.replace("!\n ", "").replace('\n', "")))
        .ok()?;
    // SNS may wrap the notification as a string in its own envelope.
    let v = match v.get("Message").and_then(Value::as_str) {
        Some(inner) if v.get("Type").and_then(Value::as_str) == Some("Notification") => {
            serde_json::from_str(inner).ok()?
        }
        _ => v,
    };
    let kind = v
        .get("notificationType")
        .or_else(|| v.get("eventType"))?
        .as_str()?;
    let list = |obj: &str, arr: &str| -> Vec<Value> {
        v.get(obj)
            .and_then(|o| o.get(arr))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let s = |r: &Value, k: &str| r.get(k).and_then(Value::as_str).map(str::to_string);
    match kind {
        "Bounce" => {
            let transient = v
                .pointer("/bounce/bounceType")
                .and_then(Value::as_str)
                .is_some_and(|t| t == "Transient");
            let recipients = list("bounce", "bouncedRecipients")
                .iter()
                .filter_map(|r| {
                    let action = s(r, "action")
                        .unwrap_or_else(|| if transient { "delayed" } else { "failed" }.into());
                    Some(RcptReport::new(
                        s(r, "emailAddress")?,
                        action,
                        s(r, "status"),
                        s(r, "diagnosticCode"),
                        None,
                    ))
                })
                .collect();
            Some(Notice {
                kind: ReportKind::Bounce,
                recipients,
                feedback_type: None,
            })
        }
        "Complaint" => {
            let feedback_type = v
                .pointer("/complaint/complaintFeedbackType")
                .and_then(Value::as_str)
                .map(str::to_string);
            let recipients = list("complaint", "complainedRecipients")
                .iter()
                .filter_map(|r| {
                    Some(RcptReport::new(
                        s(r, "emailAddress")?,
                        "complained".into(),
                        None,
                        feedback_type.clone(),
                        None,
                    ))
                })
                .collect();
            Some(Notice {
                kind: ReportKind::Feedback,
                recipients,
                feedback_type,
            })
        }
        "Delivery" => {
            let reply = v
                .pointer("/delivery/smtpResponse")
                .and_then(Value::as_str)
                .map(str::to_string);
            let recipients = list("delivery", "recipients")
                .iter()
                .filter_map(|r| {
                    Some(RcptReport::new(
                        r.as_str()?.to_string(),
                        "delivered".into(),
                        Some("2.0.0".into()),
                        reply.clone(),
                        None,
                    ))
                })
                .collect();
            Some(Notice {
                kind: ReportKind::Dsn,
                recipients,
                feedback_type: None,
            })
        }
        _ => None,
    }
}
