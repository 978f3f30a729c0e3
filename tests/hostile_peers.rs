//! What a hostile receiving server can do to the smtp delivery agent. Each server here is
//! scripted on a loopback port: it is the attacker, so it is ours to write. The agent must
//! hang up, defer the mail with a reason a sysadmin can read, and hold no more of the
//! server's words than a bound.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

/// What the scripted server saw of the agent.
#[derive(Debug)]
struct Seen {
    /// Lines of its drawn-out reply written before the agent went away.
    written: usize,
    /// The agent said MAIL FROM: it took the reply as whole.
    mail: bool,
}

/// A server that answers the first connection's EHLO (or, with `in_greeting`, greets)
/// with `lines` continuation lines of 100 bytes, one every `pause`, then a last line, and
/// then takes a message as a sink would.
fn drawn_out(port: u16, lines: usize, pause: Duration, in_greeting: bool) -> mpsc::Receiver<Seen> {
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // The harness's readiness probes connect and say nothing: serve the first that speaks.
        for conn in listener.incoming().flatten() {
            if serve(conn, lines, pause, in_greeting, &tx).is_some() {
                return;
            }
        }
    });
    rx
}

/// Serves one connection; None if the client said nothing. What it saw goes to `report` as
/// soon as it is known: the agent keeps a connection open for its next message.
fn serve(
    conn: TcpStream,
    lines: usize,
    pause: Duration,
    in_greeting: bool,
    report: &mpsc::Sender<Seen>,
) -> Option<()> {
    let code = if in_greeting { "220" } else { "250" };
    let filler = format!("{code}-{}\r\n", "x".repeat(94));
    let mut out = conn.try_clone().ok()?;
    let mut input = BufReader::new(conn);
    let mut line = String::new();
    let mut written = 0;
    if !in_greeting {
        out.write_all(b"220 hostile.test ESMTP\r\n").ok()?;
        if input.read_line(&mut line).ok()? == 0 {
            return None;
        }
    }
    for _ in 0..lines {
        if out.write_all(filler.as_bytes()).is_err() {
            let _ = report.send(Seen {
                written,
                mail: false,
            });
            return Some(());
        }
        written += 1;
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    let _ = out.write_all(format!("{code} hostile.test at last\r\n").as_bytes());
    if in_greeting {
        line.clear();
        let _ = input.read_line(&mut line);
        let _ = out.write_all(b"250 hostile.test\r\n");
    }
    // A sink from here on: whatever comes is taken.
    let mut in_data = false;
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let reply: &[u8] = if in_data {
            if line != ".\r\n" {
                continue;
            }
            in_data = false;
            b"250 2.0.0 taken\r\n"
        } else if line.to_ascii_uppercase().starts_with("MAIL") {
            let _ = report.send(Seen {
                written,
                mail: true,
            });
            b"250 ok\r\n"
        } else if line.to_ascii_uppercase().starts_with("DATA") {
            in_data = true;
            b"354 go on\r\n"
        } else if line.to_ascii_uppercase().starts_with("QUIT") {
            let _ = out.write_all(b"221 bye\r\n");
            break;
        } else {
            b"250 ok\r\n"
        };
        if out.write_all(reply).is_err() {
            break;
        }
    }
    Some(())
}

/// A reply that never ends: the agent held every line (a server could send gigabytes), and
/// took the reply once it did end. Now a reply is cut off at 64 KiB: the agent hangs up and
/// defers the mail.
#[test]
fn a_reply_that_never_ends_is_cut_off_and_the_mail_deferred() {
    let port = free_port();
    let mut inst = relay_instance(
        &[("hostile.test", port)],
        "[outgoing]\nmin_backoff = 3600\nmax_backoff = 3600\n",
    );
    // 20 MB of EHLO reply, written as fast as the agent reads it.
    let seen = drawn_out(port, 200_000, Duration::ZERO, false);
    inst.start();
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["bob@hostile.test"],
        "Subject: to a hostile host\r\n\r\nhello\r\n",
        "",
    );
    let seen = seen
        .recv_timeout(Duration::from_secs(120))
        .expect("the agent spoke to the hostile server");
    assert!(
        !seen.mail,
        "the agent took a 20 MB reply as a reply: {seen:?}"
    );
    assert!(
        seen.written < 200_000,
        "the agent read the whole of it: {seen:?}"
    );
    wait_for("the deferral", Duration::from_secs(30), || {
        queued_reply(&inst, "bob@hostile.test").is_some_and(|r| r.contains("reply"))
    });
    let why = queued_reply(&inst, "bob@hostile.test").unwrap_or_default();
    assert!(why.contains("longer than 65536 bytes"), "{why}");
    assert!(
        why.len() < 1000,
        "the reason holds the reply's lines: {why}"
    );
}

/// A reply trickled a line at a time, each within the command timeout, kept the agent for
/// as long as the server liked. Now the whole reply must come within the timeout.
#[test]
fn a_reply_trickled_a_line_at_a_time_ends_at_the_command_timeout() {
    let port = free_port();
    let mut inst = relay_instance(
        &[("hostile.test", port)],
        "[outgoing]\ncommand_timeout = 2\nmin_backoff = 3600\nmax_backoff = 3600\n",
    );
    // A greeting of 40 lines, one every half second: 20 s, ten times the timeout.
    let seen = drawn_out(port, 40, Duration::from_millis(500), true);
    inst.start();
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &["bob@hostile.test"],
        "Subject: to a slow host\r\n\r\nhello\r\n",
        "",
    );
    let seen = seen
        .recv_timeout(Duration::from_secs(120))
        .expect("the agent spoke to the hostile server");
    assert!(
        !seen.mail && seen.written < 40,
        "the agent waited out the whole greeting: {seen:?}"
    );
    wait_for("the deferral", Duration::from_secs(30), || {
        queued_reply(&inst, "bob@hostile.test").is_some()
    });
    let why = queued_reply(&inst, "bob@hostile.test").unwrap_or_default();
    assert!(why.contains("no whole reply within 2 s"), "{why}");
}
