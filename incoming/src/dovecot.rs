//! `[auth] dovecot`: passwords checked by Dovecot's authentication service over its
//! `auth-client` socket (the protocol Postfix's `smtpd_sasl_type = dovecot` speaks), so that
//! users have one password for reading and sending mail.
//!
//! One connection per check: `VERSION` and `CPID`, the server's handshake up to `DONE`, then
//! `AUTH` with the PLAIN response; `OK` is a pass, anything else a refusal. The password goes
//! only into that socket, never into a log.

use base64::Engine;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long Dovecot may take to answer before the check counts as failed.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The most lines of handshake, and bytes a line, taken from the socket.
const MAX_LINES: usize = 256;
const MAX_LINE: u64 = 16 * 1024;

/// Dovecot's answer about a login.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// Dovecot could not be asked (the socket, the protocol): a temporary failure.
    Unavailable(String),
}

/// Asks Dovecot at `socket` whether `user` has `password`; `secured` says the session is
/// under TLS, `ip` is the client's address (for Dovecot's own logs and limits).
pub fn verify(
    socket: &Path,
    user: &str,
    password: &str,
    secured: bool,
    ip: Option<std::net::IpAddr>,
) -> Verdict {
    match ask(socket, user, password, secured, ip) {
        Ok(true) => Verdict::Pass,
        Ok(false) => Verdict::Fail,
        Err(e) => Verdict::Unavailable(format!("Dovecot auth at {}: {e}", socket.display())),
    }
}

fn ask(
    socket: &Path,
    user: &str,
    password: &str,
    secured: bool,
    ip: Option<std::net::IpAddr>,
) -> std::io::Result<bool> {
    // A tab or line end in either would end the field early: never a valid login.
    if [user, password]
        .iter()
        .any(|s| s.contains(['\t', '\n', '\r', '\0']))
    {
        return Ok(false);
    }
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    write!(s, "VERSION\t1\t2\nCPID\t{}\n", std::process::id())?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    let mut next = |line: &mut String| -> std::io::Result<usize> {
        line.clear();
        (&mut r).take(MAX_LINE).read_line(line)
    };
    let mut plain = false;
    let mut done = false;
    for _ in 0..MAX_LINES {
        if next(&mut line)? == 0 {
            return Err(std::io::Error::other("closed during the handshake"));
        }
        let l = line.trim_end();
        plain |= l.starts_with("MECH\tPLAIN");
        if l == "DONE" {
            done = true;
            break;
        }
    }
    if !done {
        return Err(std::io::Error::other("no end to its handshake"));
    }
    if !plain {
        return Err(std::io::Error::other("PLAIN is not among its mechanisms"));
    }
    let resp = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    let mut cmd = String::from("AUTH\t1\tPLAIN\tservice=smtp\tnologin");
    if secured {
        cmd.push_str("\tsecured");
    }
    if let Some(ip) = ip {
        cmd.push_str(&format!("\trip={ip}"));
    }
    cmd.push_str(&format!("\tresp={resp}\n"));
    s.write_all(cmd.as_bytes())?;
    if next(&mut line)? == 0 {
        return Err(std::io::Error::other("closed before it answered"));
    }
    Ok(line.starts_with("OK\t1"))
}
