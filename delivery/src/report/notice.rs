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
    let v = notification(text)?;
    let kind = v
        .get("notificationType")
        .or_else(|| v.get("eventType"))?
        .as_str()?;
    match kind {
        "Bounce" => Some(bounce(&v)),
        "Complaint" => Some(complaint(&v)),
        "Delivery" => Some(delivery(&v)),
        _ => None,
    }
}

/// The JSON object a text body holds, unwrapped from SNS's envelope if it came in one.
fn notification(text: &str) -> Option<Value> {
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
    match v.get("Message").and_then(Value::as_str) {
        Some(inner) if v.get("Type").and_then(Value::as_str) == Some("Notification") => {
            serde_json::from_str(inner).ok()
        }
        _ => Some(v),
    }
}

/// The array `v.obj.arr`, empty when missing.
fn list(v: &Value, obj: &str, arr: &str) -> Vec<Value> {
    v.get(obj)
        .and_then(|o| o.get(arr))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn text_of(r: &Value, k: &str) -> Option<String> {
    r.get(k).and_then(Value::as_str).map(str::to_string)
}

fn bounce(v: &Value) -> Notice {
    let transient = v
        .pointer("/bounce/bounceType")
        .and_then(Value::as_str)
        .is_some_and(|t| t == "Transient");
    let recipients = list(v, "bounce", "bouncedRecipients")
        .iter()
        .filter_map(|r| {
            let action = text_of(r, "action")
                .unwrap_or_else(|| if transient { "delayed" } else { "failed" }.into());
            Some(RcptReport::new(
                text_of(r, "emailAddress")?,
                action,
                text_of(r, "status"),
                text_of(r, "diagnosticCode"),
                None,
            ))
        })
        .collect();
    Notice {
        kind: ReportKind::Bounce,
        recipients,
        feedback_type: None,
    }
}

fn complaint(v: &Value) -> Notice {
    let feedback_type = v
        .pointer("/complaint/complaintFeedbackType")
        .and_then(Value::as_str)
        .map(str::to_string);
    let recipients = list(v, "complaint", "complainedRecipients")
        .iter()
        .filter_map(|r| {
            Some(RcptReport::new(
                text_of(r, "emailAddress")?,
                "complained".into(),
                None,
                feedback_type.clone(),
                None,
            ))
        })
        .collect();
    Notice {
        kind: ReportKind::Feedback,
        recipients,
        feedback_type,
    }
}

fn delivery(v: &Value) -> Notice {
    let reply = v
        .pointer("/delivery/smtpResponse")
        .and_then(Value::as_str)
        .map(str::to_string);
    let recipients = list(v, "delivery", "recipients")
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
    Notice {
        kind: ReportKind::Dsn,
        recipients,
        feedback_type: None,
    }
}
