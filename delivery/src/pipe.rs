//! Delivery to a program: the message on stdin, the envelope in the environment (as
//! qmail-local and Postfix local(8) give it); the exit code decides.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub enum Outcome {
    Delivered,
    Deferred(String),
    Failed(String),
}

pub struct Envelope<'a> {
    pub sender: &'a str,
    pub recipient: &'a str,
    pub user: &'a str,
    pub extension: &'a str,
    pub domain: &'a str,
    pub local: &'a str,
}

pub fn run(command: &str, env: &Envelope, message: &[u8], timeout: Duration) -> Outcome {
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .env("SENDER", env.sender)
        .env("RECIPIENT", env.recipient)
        .env("USER", env.user)
        .env("EXTENSION", env.extension)
        .env("DOMAIN", env.domain)
        .env("LOCAL", env.local)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return Outcome::Deferred(format!("cannot run {command:?}: {e}")),
    };
    if let Some(mut stdin) = child.stdin.take() {
        let data = message.to_vec();
        // A program that exits without reading everything must not block us.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    let mut stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.take(4096).read_to_end(&mut buf);
        }
        buf
    });
    let end = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let err = err_reader.join().unwrap_or_default();
    let first_lines: String = String::from_utf8_lossy(&err)
        .lines()
        .take(3)
        .collect::<Vec<_>>()
        .join(" / ");
    match status {
        None => Outcome::Deferred(format!(
            "4.3.0 command {command:?} timed out after {} s and was killed",
            timeout.as_secs()
        )),
        Some(s) if s.success() => Outcome::Delivered,
        Some(s) if s.code() == Some(75) => Outcome::Deferred(format!(
            "4.3.0 command {command:?} asked to try again later (exit 75) {first_lines}"
        )),
        Some(s) => Outcome::Failed(
            format!("5.3.0 command {command:?} failed ({s}) {first_lines}")
                .trim()
                .to_string(),
        ),
    }
}
