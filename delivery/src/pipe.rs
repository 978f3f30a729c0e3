//! Delivery to a program: the message on stdin, the envelope in the environment (as
//! qmail-local and Postfix local(8) give it), nothing else inherited; the exit code decides.

use qms_common::privs::{self, Account};
use std::process::Command;
use std::time::Duration;

pub enum Outcome {
    Delivered,
    Deferred(String),
    Failed(String),
}

pub struct Envelope<'a> {
    pub sender: &'a str,
    pub recipient: &'a str,
    pub original_recipient: &'a str,
    pub extension: &'a str,
    pub domain: &'a str,
    pub local: &'a str,
}

/// Runs `command` through /bin/sh as the current process's user, whose account is `user`.
pub fn run(
    command: &str,
    user: &Account,
    env: &Envelope,
    message: &[u8],
    timeout: Duration,
) -> Outcome {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .env_clear()
        .envs(privs::delivery_env(user))
        .env("SENDER", env.sender)
        .env("RECIPIENT", env.recipient)
        .env("ORIGINAL_RECIPIENT", env.original_recipient)
        .env("EXTENSION", env.extension)
        .env("DOMAIN", env.domain)
        .env("LOCAL", env.local)
        .current_dir(if user.home.is_dir() {
            user.home.as_path()
        } else {
            std::path::Path::new("/")
        });
    let done = match crate::program::run(&mut cmd, message, timeout, 0) {
        Ok(d) => d,
        Err(e) => return Outcome::Deferred(format!("4.3.0 cannot run {command:?}: {e}")),
    };
    let first_lines = done.stderr;
    match done.status {
        None => Outcome::Deferred(format!(
            "4.3.0 command {command:?} timed out after {} s and was killed",
            timeout.as_secs()
        )),
        Some(s) if s.success() => Outcome::Delivered,
        Some(s) if s.code() == Some(75) => Outcome::Deferred(format!(
            "4.3.0 command {command:?} asked to try again later (exit 75) {first_lines}"
        )),
        // The shell's "not found" and "not executable": a configuration to fix, not a refusal.
        Some(s) if matches!(s.code(), Some(126 | 127)) => Outcome::Deferred(format!(
            "4.3.5 command {command:?} cannot be run ({s}): fix the program or the alias {first_lines}"
        )),
        Some(s) => Outcome::Failed(
            format!("5.3.0 command {command:?} failed ({s}) {first_lines}")
                .trim()
                .to_string(),
        ),
    }
}
