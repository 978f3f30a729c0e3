//! Log lines in the key=value form sysadmins grep: `qms/ROLE[PID]: qid=... status=...`,
//! or as JSON objects, or in Postfix's shape (`postfix.rs`).
//!
//! Lines go to stderr, where systemd's journal (or the supervisor's terminal) picks them up,
//! or to syslog or a file (`[log] target`). Outside the journal each line starts with a UTC
//! time stamp.

mod postfix;

use std::fmt::Write as _;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

static ROLE: OnceLock<String> = OnceLock::new();
static STAMP: OnceLock<bool> = OnceLock::new();
static FORMAT: AtomicU8 = AtomicU8::new(0);
/// The name before `/ROLE` in every line (`[log] syslog_name`, as Postfix's `syslog_name`).
static NAME: OnceLock<String> = OnceLock::new();
/// This host's name, written after the time stamp in Postfix's shape (syslog's own field).
static HOST: OnceLock<String> = OnceLock::new();

/// How a line is written (`[log] format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// `qid=… status=…`: the default.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
    /// Postfix's lines (`QID: to=<…>, relay=…, status=sent (…)`), for pflogsumm and fail2ban.
    Postfix,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "text" => Some(Format::Text),
            "json" => Some(Format::Json),
            "postfix" => Some(Format::Postfix),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
            Format::Postfix => "postfix",
        }
    }
}

fn format() -> Format {
    match FORMAT.load(Ordering::Relaxed) {
        1 => Format::Json,
        2 => Format::Postfix,
        _ => Format::Text,
    }
}
static SYSLOG: OnceLock<Option<std::os::unix::net::UnixDatagram>> = OnceLock::new();

/// Where the lines of a process go (`[log] target`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Target {
    /// The journal under systemd, or the terminal (the default).
    #[default]
    Stderr,
    /// /dev/log, facility mail: /var/log/mail.log where rsyslog writes it.
    Syslog,
    /// Appended to a file, one write per line.
    File(std::path::PathBuf),
}

static FILE: OnceLock<std::fs::File> = OnceLock::new();

/// Set by `qms start --daemon` for itself and its processes: stderr is gone, so lines meant
/// for it go to the system log.
pub const DETACHED_ENV: &str = "QMS_DETACHED";

/// Sends every following line where `[log] target` says. A file that cannot be opened
/// leaves the lines on stderr, with one line saying why.
pub fn set_target(t: &Target) {
    // `qms start --daemon` has no stderr to keep: it asks its processes for syslog.
    if *t == Target::Stderr && std::env::var_os(DETACHED_ENV).is_some() {
        return to_syslog();
    }
    match t {
        Target::Stderr => {}
        Target::Syslog => to_syslog(),
        Target::File(p) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            Ok(f) => {
                let _ = FILE.set(f);
            }
            Err(e) => write(&format!(
                "status=warning reason={}",
                quote(&format!("cannot open the log file {}: {e}", p.display()))
            )),
        },
    }
}

/// Gives the log file to the mail system's user, so that the roles, which run as that user,
/// append to the file root created (through the open file: no path is followed again).
pub fn give_file_to(uid: u32, gid: u32) {
    if let Some(f) = FILE.get() {
        let _ = nix::unistd::fchown(
            f,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        );
    }
}

/// For a command run by a person or a program (`sendmail`, `qms queue`): its lines go where
/// the daemon's go, in the daemon's format, and when that is stderr (the journal's or a
/// terminal's, not this caller's), to the system log; never onto the caller's terminal or
/// mail client.
pub fn for_command(cfg: &crate::config::Config) {
    set_format(cfg.log_format, &cfg.log_syslog_name, &cfg.hostname);
    match &cfg.log_target {
        Target::Stderr => to_syslog(),
        other => set_target(other),
    }
}

/// Sends every following line to the system log, facility mail, instead of stderr: for
/// commands whose stderr is a user's terminal or a mail client (`sendmail`), as Postfix's
/// sendmail logs to mail.log. The socket is /dev/log (`QMS_SYSLOG_SOCKET` names another);
/// without one the lines are dropped, never shown to the user.
pub fn to_syslog() {
    let path = std::env::var_os("QMS_SYSLOG_SOCKET").unwrap_or_else(|| "/dev/log".into());
    // Never blocking: a stuck syslog daemon costs lines, not mail.
    let sock = std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| s.connect(&path).map(|()| s))
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .ok();
    let _ = SYSLOG.set(sock);
}

/// Sets how every following line is written, the name that starts its tag (`qms`, or
/// `postfix-qms` for tools that look for Postfix's names) and the host name Postfix's shape
/// writes in files.
pub fn set_format(format: Format, name: &str, host: &str) {
    let n = match format {
        Format::Text => 0,
        Format::Json => 1,
        Format::Postfix => 2,
    };
    FORMAT.store(n, Ordering::Relaxed);
    let _ = NAME.set(name.to_string());
    let _ = HOST.set(host.to_string());
}

/// Names the process role that prefixes every line (`smtpd`, `router`, `deliver/local`, …).
pub fn init(role: &str) {
    let _ = ROLE.set(role.to_string());
    let _ = STAMP.set(std::env::var_os("JOURNAL_STREAM").is_none());
}

pub fn write(line: &str) {
    let line = &*defang(line);
    let role = ROLE.get().map(String::as_str).unwrap_or("qms");
    match format() {
        Format::Postfix => {
            for (prog, text) in postfix::lines(role, line) {
                out(&prog, &text);
            }
        }
        Format::Json if SYSLOG.get().is_none() => emit(format!("{}\n", json(role, line))),
        _ => out(role, line),
    }
}

/// The line as one JSON object: time, role, pid, its pairs, and any text after them.
fn json(role: &str, line: &str) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    obj.insert(
        "time".into(),
        crate::time::iso8601(crate::time::now()).into(),
    );
    obj.insert("role".into(), role.into());
    obj.insert("pid".into(), crate::pid().into());
    let (pairs, rest) = parse_pairs(line);
    for (k, v) in pairs {
        obj.insert(k, v.into());
    }
    if !rest.is_empty() {
        obj.insert("text".into(), rest.into());
    }
    serde_json::Value::Object(obj)
}

/// Writes `NAME/PROG[PID]: text` where the lines go: syslog adds time and host itself;
/// elsewhere a UTC time stamp leads, and in Postfix's shape the host name follows it, where
/// syslog puts it and log readers look for it.
fn out(prog: &str, text: &str) {
    let name = NAME.get().map(String::as_str).unwrap_or("qms");
    // Postfix has one smtpd process per session, and pflogsumm pairs `connect from` with
    // `disconnect from` by its pid: our smtpd's lines carry their session thread's id, which
    // no other session uses while this one lasts.
    let pid = if prog == "smtpd" && format() == Format::Postfix {
        nix::unistd::gettid().as_raw() as u32
    } else {
        crate::pid()
    };
    if let Some(sock) = SYSLOG.get() {
        // RFC 3164 shape: <PRI>TAG[PID]: text; PRI 22 is facility mail, severity info.
        let msg = format!("<22>{name}/{prog}[{pid}]: {text}");
        if let Some(s) = sock {
            let _ = s.send(msg.as_bytes());
        }
        return;
    }
    // Built in one string: a line is one allocation and one write.
    let mut line = String::with_capacity(text.len() + 96);
    if *STAMP.get().unwrap_or(&true) {
        let _ = write!(line, "{} ", crate::time::Iso8601(crate::time::now()));
        if format() == Format::Postfix {
            line.push_str(HOST.get().map(String::as_str).unwrap_or("localhost"));
            line.push(' ');
        }
    }
    let _ = writeln!(line, "{name}/{prog}[{pid}]: {text}");
    emit(line);
}

/// One write() per line: processes share the log file, and a line written in pieces could
/// be cut by another process's line. No lock is taken: a single write of a line is not cut
/// by another thread's (O_APPEND files, pipes up to 4 KiB), and stderr's lock made smtpd's
/// sessions sleep and wake each other at every line (seven futex calls a message).
fn emit(line: String) {
    let held = HELD.with(|h| match h.borrow_mut().as_mut() {
        Some(lines) => {
            lines.push_str(&line);
            true
        }
        None => false,
    });
    if !held {
        write_out(&line);
    }
}

thread_local! {
    /// Lines held by [`together`] on this thread, to be written at its end.
    static HELD: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// A pipe keeps one write whole only up to this size (PIPE_BUF).
const WHOLE_WRITE: usize = 4096;

/// Runs `f` with this thread's lines held, and writes them when it ends in one write (as one
/// write per line when together they are too long to stay whole in a pipe): smtpd's two
/// lines for a message, `queued` and `routed`, cost one system call. Lines to syslog go one
/// datagram each, as before.
pub fn together<T>(f: impl FnOnce() -> T) -> T {
    struct Release(bool);
    impl Drop for Release {
        fn drop(&mut self) {
            if !self.0 {
                return;
            }
            let Some(lines) = HELD.with(|h| h.borrow_mut().take()) else {
                return;
            };
            if lines.len() <= WHOLE_WRITE {
                write_out(&lines);
            } else {
                lines.split_inclusive('\n').for_each(write_out);
            }
        }
    }
    let outermost = HELD.with(|h| {
        let mut h = h.borrow_mut();
        let first = h.is_none();
        h.get_or_insert_with(String::new);
        first
    });
    let _release = Release(outermost);
    f()
}

/// Writes one line, or several lines of one caller, in one write.
fn write_out(line: &str) {
    match FILE.get() {
        Some(mut f) => {
            let _ = f.write_all(line.as_bytes());
        }
        None => {
            let _ = write_unlocked(std::io::stderr().as_fd(), line.as_bytes());
        }
    }
}

/// Writes all of `buf` to `fd`, retrying a short or interrupted write, without std's lock.
fn write_unlocked(fd: std::os::fd::BorrowedFd<'_>, mut buf: &[u8]) -> nix::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(0) => return Err(nix::errno::Errno::EIO),
            Ok(n) => buf = &buf[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The value quoted, keeping the String it came in when it needs no quotes.
pub fn quote_owned(v: String) -> String {
    match quote(&v) {
        std::borrow::Cow::Owned(q) => q,
        std::borrow::Cow::Borrowed(_) => v,
    }
}

/// Quotes a value for a key=value line when it holds a space, `=`, `"` or any control
/// character; inside quotes `"` and `\\` are escaped and control characters written as
/// `\n`, `\r`, `\t` or `\xNN`, so no value from a peer can end a line, start a field or
/// send a terminal escape.
pub fn quote(v: &str) -> std::borrow::Cow<'_, str> {
    let plain = |c: char| !(c == ' ' || c == '"' || c == '=' || c == '\\' || c.is_control());
    if !v.is_empty() && v.chars().all(plain) {
        return std::borrow::Cow::Borrowed(v);
    }
    let mut s = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if c.is_control() => s.push_str(&format!("\\x{:02x}", c as u32)),
            c => s.push(c),
        }
    }
    s.push('"');
    std::borrow::Cow::Owned(s)
}

/// The last line of defence: any control character left in a finished line (a value that
/// was not quoted) is written as `\xNN`.
fn defang(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut s = String::with_capacity(line.len() + 8);
    for c in line.chars() {
        if c.is_control() {
            s.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            s.push(c);
        }
    }
    std::borrow::Cow::Owned(s)
}

/// Splits a key=value line into its pairs (quoted values unquoted) and any trailing text.
pub fn parse_pairs(line: &str) -> (Vec<(String, String)>, String) {
    let mut pairs = Vec::new();
    let mut rest = line.trim_start();
    while let Some(eq) = rest.find('=') {
        let key = &rest[..eq];
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            break;
        }
        let after = &rest[eq + 1..];
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, 'n')) => v.push('\n'),
                        Some((_, 'r')) => v.push('\r'),
                        Some((_, 't')) => v.push('\t'),
                        Some((_, c)) => v.push(c),
                        None => {}
                    },
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            (v, &q[end.min(q.len())..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        pairs.push((key.to_string(), value));
        rest = next.trim_start();
    }
    (pairs, rest.to_string())
}

/// `qlog!("qid={} status={}", id, quote(&reply))` writes one log line.
#[macro_export]
macro_rules! qlog {
    ($($arg:tt)*) => { $crate::log::write(&format!($($arg)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held() -> Option<String> {
        HELD.with(|h| h.borrow().clone())
    }

    #[test]
    fn lines_of_together_are_held_until_its_outermost_call_ends_even_by_a_panic() {
        together(|| {
            emit("one\n".into());
            together(|| emit("two\n".into()));
            assert_eq!(
                held().as_deref(),
                Some("one\ntwo\n"),
                "held past the inner call"
            );
        });
        assert_eq!(held(), None, "written at the end");
        let r = std::panic::catch_unwind(|| together(|| panic!("in the middle")));
        assert!(r.is_err());
        assert_eq!(
            held(),
            None,
            "a panic does not leave the thread holding its lines"
        );
    }

    #[test]
    fn lines_written_by_threads_at_once_into_a_pipe_come_out_whole() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut text).unwrap();
            text
        });
        std::thread::scope(|s| {
            for t in 0..8 {
                let w = w.as_fd();
                s.spawn(move || {
                    for i in 0..2000 {
                        let line = format!("t={t} i={i} {}\n", "x".repeat(100 + t * 300));
                        write_unlocked(w, line.as_bytes()).unwrap();
                    }
                });
            }
        });
        drop(w);
        let text = reader.join().unwrap();
        let mut count = 0;
        for line in text.lines() {
            let (pairs, rest) = parse_pairs(line);
            let t: usize = pairs[0].1.parse().unwrap();
            assert_eq!(pairs[1].0, "i");
            assert_eq!(rest, "x".repeat(100 + t * 300), "a line cut by another");
            count += 1;
        }
        assert_eq!(count, 8 * 2000);
    }

    #[test]
    fn pairs_round_trip() {
        let line = format!(
            "qid=ABC to=a@b.test reply={} status=sent (250 ok)",
            quote("550 5.1.1 \"x\" y")
        );
        let (pairs, rest) = parse_pairs(&line);
        assert_eq!(pairs[0], ("qid".to_string(), "ABC".to_string()));
        assert_eq!(pairs[2].1, "550 5.1.1 \"x\" y");
        assert_eq!(pairs[3].1, "sent");
        assert_eq!(rest, "(250 ok)");
    }

    #[test]
    fn control_characters_never_reach_the_log_raw() {
        let q = quote("evil\x1b]0;owned\x07\x1b[2J");
        assert!(!q.chars().any(char::is_control), "{q}");
        assert_eq!(q, "\"evil\\x1b]0;owned\\x07\\x1b[2J\"");
        assert_eq!(quote("x status=sent"), "\"x status=sent\"");
        assert!(!defang("helo=a\x1bb").chars().any(char::is_control));
    }
}
