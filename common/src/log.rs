//! Log lines in the key=value form sysadmins grep: `qms/ROLE[PID]: qid=... status=...`.
//!
//! Lines go to stderr, where systemd's journal (or the supervisor's terminal) picks them up.
//! Outside the journal each line starts with a UTC time stamp.

use std::io::Write;
use std::sync::OnceLock;

static ROLE: OnceLock<String> = OnceLock::new();
static STAMP: OnceLock<bool> = OnceLock::new();

/// Names the process role that prefixes every line (`smtpd`, `router`, `deliver/local`, …).
pub fn init(role: &str) {
    let _ = ROLE.set(role.to_string());
    let _ = STAMP.set(std::env::var_os("JOURNAL_STREAM").is_none());
}

pub fn write(line: &str) {
    let role = ROLE.get().map(String::as_str).unwrap_or("qms");
    let stamp = if *STAMP.get().unwrap_or(&true) {
        format!("{} ", crate::time::iso8601(crate::time::now()))
    } else {
        String::new()
    };
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{stamp}qms/{role}[{}]: {line}", std::process::id());
}

/// Quotes a value for a key=value line when it holds spaces or quotes.
pub fn quote(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '"', '=', '\t', '\n', '\r']) {
        return v.to_string();
    }
    let mut s = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// `qlog!("qid={} status={}", id, quote(&reply))` writes one log line.
#[macro_export]
macro_rules! qlog {
    ($($arg:tt)*) => { $crate::log::write(&format!($($arg)*)) };
}
