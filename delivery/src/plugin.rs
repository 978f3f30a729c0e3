//! Submission plugins (`BX-MTA-Submission-Pre-Plugins`, `-Post-Plugins`): programs from the
//! `[msp] plugin_dir` allow-list. A header only names a plugin; it never gives a path or a
//! command, and a plugin runs directly (no shell) as the qms user with a clean environment.
//!
//! A pre-plugin gets the message on stdin before it is routed: exit 0 sends it on (replaced
//! by what the plugin printed, if anything), exit 75 tries again later, any other exit
//! refuses it (stderr says why, in the error mail). A post-plugin runs after each delivery
//! attempt with the result in its environment (`QMS_RESULT`, `QMS_RESULTS`) and one JSON
//! line per recipient on stdin; its exit code is logged, nothing else depends on it.

use crate::program;
use qms_common::log::quote;
use qms_common::{qlog, Config};
use qms_spool::{Job, Recipient};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The plugin names in a header value: words separated by commas or spaces.
pub fn names(value: &str) -> Vec<String> {
    value
        .split([',', ' ', '\t'])
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect()
}

/// The program behind a plugin name, if the allow-list has it.
pub fn resolve(cfg: &Config, name: &str) -> Result<PathBuf, String> {
    let Some(dir) = &cfg.msp.plugin_dir else {
        return Err(format!("plugin {name:?} refused: no plugin_dir in [msp]"));
    };
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !plain {
        return Err(format!("plugin name {name:?} is not a plain file name"));
    }
    let path = dir.join(name);
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(path),
        Ok(_) => Err(format!(
            "plugin {name:?} is not an executable file in {}",
            dir.display()
        )),
        Err(_) => Err(format!("plugin {name:?} is not in {}", dir.display())),
    }
}

/// What a pre-plugin decided.
pub enum Pre {
    Keep,
    Replace(Vec<u8>),
    /// Refused for good; the text is for the error mail.
    Refuse(String),
    Later(String),
}

fn command(path: &PathBuf, job: &Job, stage: &str) -> Command {
    let mut cmd = Command::new(path);
    let rcpts: Vec<String> = job
        .recipients
        .iter()
        .map(|r| r.address.to_string())
        .collect();
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("QMS_STAGE", stage)
        .env("QMS_QUEUE_ID", job.id.as_str())
        .env("QMS_SENDER", qms_common::address::show_sender(&job.sender))
        .env("QMS_RECIPIENTS", rcpts.join(" "))
        .env("QMS_MESSAGE_ID", job.message_id.as_deref().unwrap_or(""))
        .env("QMS_CROSSREF", job.crossref.as_deref().unwrap_or(""));
    cmd
}

/// Runs pre-plugin `name` on `msg`.
pub fn pre(cfg: &Config, job: &Job, name: &str, msg: &[u8]) -> Pre {
    let path = match resolve(cfg, name) {
        Ok(p) => p,
        Err(e) => return Pre::Refuse(e),
    };
    let timeout = Duration::from_secs(cfg.msp.plugin_timeout);
    let limit = usize::try_from(cfg.limits.message_size).unwrap_or(usize::MAX);
    let done = match program::run(&mut command(&path, job, "pre"), msg, timeout, limit) {
        Ok(d) => d,
        Err(e) => return Pre::Later(format!("cannot run plugin {name:?}: {e}")),
    };
    let why = if done.stderr.is_empty() {
        String::new()
    } else {
        format!(": {}", done.stderr)
    };
    match (done.status, done.stdout) {
        (None, _) => Pre::Later(format!("plugin {name:?} timed out and was killed")),
        (Some(s), Some(out)) if s.success() && out.is_empty() => Pre::Keep,
        (Some(s), Some(out)) if s.success() => Pre::Replace(crlf(&out)),
        (Some(s), None) if s.success() => Pre::Refuse(format!(
            "plugin {name:?} printed more than the message size limit"
        )),
        (Some(s), _) if s.code() == Some(75) => {
            Pre::Later(format!("plugin {name:?} asked to try again later{why}"))
        }
        (Some(s), _) => Pre::Refuse(format!("refused by plugin {name:?} ({s}){why}")),
    }
}

/// A plugin may print bare LF lines; the spool holds CRLF.
fn crlf(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + msg.len() / 40);
    for (i, &b) in msg.iter().enumerate() {
        if b == b'\n' && (i == 0 || msg[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// Tells the job's post-plugins how an attempt went for `attempted` (recipients with the
/// state and reply of this attempt). They run in the background: a slow plugin never holds
/// up delivery.
pub fn post(cfg: &Config, job: &Job, attempted: &[Recipient]) {
    if job.post_plugins.is_empty() || attempted.is_empty() {
        return;
    }
    let states: Vec<&str> = attempted.iter().map(|r| r.state.as_str()).collect();
    let result = if states.iter().all(|s| *s == states[0]) {
        states[0]
    } else {
        "mixed"
    };
    let mut lines = String::new();
    let mut json = Vec::new();
    for r in attempted {
        let reply = r.reply.as_deref().unwrap_or("");
        lines.push_str(&format!("{} {} {reply}\n", r.address, r.state.as_str()));
        let doc = serde_json::json!({
            "recipient": r.address.to_string(),
            "state": r.state.as_str(),
            "reply": reply,
        });
        json.extend_from_slice(doc.to_string().as_bytes());
        json.push(b'\n');
    }
    let timeout = Duration::from_secs(cfg.msp.plugin_timeout);
    for name in &job.post_plugins {
        let path = match resolve(cfg, name) {
            Ok(p) => p,
            Err(e) => {
                qlog!("qid={} status=plugin-error reason={}", job.id, quote(&e));
                continue;
            }
        };
        let mut cmd = command(&path, job, "post");
        cmd.env("QMS_RESULT", result)
            .env("QMS_RESULTS", &lines)
            .env("QMS_ATTEMPT", (job.attempts + 1).to_string());
        let (id, name, json) = (job.id.clone(), name.clone(), json.clone());
        std::thread::spawn(move || {
            let status = match program::run(&mut cmd, &json, timeout, 0) {
                Ok(d) => match d.status {
                    Some(s) if s.success() => "ok".to_string(),
                    Some(s) => format!("{s} {}", d.stderr),
                    None => "timed out, killed".to_string(),
                },
                Err(e) => format!("cannot run: {e}"),
            };
            qlog!(
                "qid={id} plugin={name} stage=post result={result} status={}",
                quote(status.trim())
            );
        });
    }
}
