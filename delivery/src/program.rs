//! Running a helper program under a time limit: input on stdin (written from a thread, so a
//! program that stops reading cannot block us), stdout kept up to a limit, the head of stderr.

use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Finished {
    /// None: killed at the time limit.
    pub status: Option<ExitStatus>,
    /// What it printed, up to the limit; None when it printed more than that.
    pub stdout: Option<Vec<u8>>,
    /// The first lines of stderr, joined with ` / `, for logs and error mail.
    pub stderr: String,
}

/// Runs `cmd` (whose environment and arguments the caller has set) with `input` on stdin.
/// `stdout_limit` 0 sends stdout to /dev/null.
pub fn run(
    cmd: &mut Command,
    input: &[u8],
    timeout: Duration,
    stdout_limit: usize,
) -> std::io::Result<Finished> {
    let out = if stdout_limit > 0 {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        let data = input.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    let mut stdout = child.stdout.take();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(o) = stdout.as_mut() {
            let _ = o.take(stdout_limit as u64 + 1).read_to_end(&mut buf);
            // Drain the rest so the program is not blocked writing it.
            let _ = std::io::copy(o, &mut std::io::sink());
        }
        buf
    });
    let mut stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.take(4096).read_to_end(&mut buf);
            let _ = std::io::copy(e, &mut std::io::sink());
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
    let stdout = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&err)
        .lines()
        .take(3)
        .collect::<Vec<_>>()
        .join(" / ");
    Ok(Finished {
        status,
        stdout: (stdout.len() <= stdout_limit).then_some(stdout),
        stderr,
    })
}
