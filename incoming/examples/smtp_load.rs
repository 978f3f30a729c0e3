//! A load generator like Postfix's smtp-source, that can also put header fields of our
//! own in each message (smtp-source cannot): for benchmarks of tracked sending.
//!
//! cargo run --release -p qms-incoming --example smtp_load -- \
//!     --port 2525 -n 5000 -s 20 -l 2048 --to rcpt@bench.test [--headers FILE]
//!
//! One message per connection, `-s` connections at once. `{i}` in the headers file becomes
//! the message number. Prints how long the server took to accept them all.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

struct Args {
    port: u16,
    n: usize,
    sessions: usize,
    size: usize,
    from: String,
    to: String,
    headers: String,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        port: 2525,
        n: 1000,
        sessions: 20,
        size: 2048,
        from: "sender@bench.test".into(),
        to: "rcpt@bench.test".into(),
        headers: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--port" => a.port = num(value()?)? as u16,
            "-n" => a.n = num(value()?)?,
            "-s" => a.sessions = num(value()?)?.max(1),
            "-l" => a.size = num(value()?)?,
            "--from" => a.from = value()?,
            "--to" => a.to = value()?,
            "--headers" => {
                let f = value()?;
                a.headers = std::fs::read_to_string(&f).map_err(|e| format!("{f}: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn reply(r: &mut BufReader<TcpStream>) -> std::io::Result<u16> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0));
        }
    }
}

fn send_one(a: &Args, i: usize, body: &str) -> std::io::Result<()> {
    let s = TcpStream::connect(("127.0.0.1", a.port))?;
    s.set_nodelay(true)?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let expect = |code: u16, want: u16| {
        if code == want {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("got {code}, wanted {want}")))
        }
    };
    expect(reply(&mut r)?, 220)?;
    w.write_all(b"EHLO load.bench.test\r\n")?;
    expect(reply(&mut r)?, 250)?;
    // Pipelined, as smtp-source does against a PIPELINING server.
    write!(
        w,
        "MAIL FROM:<{}>\r\nRCPT TO:<{}>\r\nDATA\r\n",
        a.from, a.to
    )?;
    expect(reply(&mut r)?, 250)?;
    expect(reply(&mut r)?, 250)?;
    expect(reply(&mut r)?, 354)?;
    let headers = a
        .headers
        .replace("{i}", &i.to_string())
        .replace('\n', "\r\n");
    write!(
        w,
        "{headers}From: <{}>\r\nTo: <{}>\r\nMessage-ID: <{i}.{}@load.bench.test>\r\nSubject: load {i}\r\n\r\n{body}.\r\n",
        a.from,
        a.to,
        std::process::id()
    )?;
    expect(reply(&mut r)?, 250)?;
    w.write_all(b"QUIT\r\n")?;
    let _ = reply(&mut r);
    Ok(())
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("smtp_load: {e}");
            std::process::exit(64);
        }
    };
    let line = "x".repeat(78) + "\r\n";
    let body = line.repeat(a.size.div_ceil(80).max(1));
    let next = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..a.sessions {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= a.n {
                    break;
                }
                if let Err(e) = send_one(&a, i, &body) {
                    if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("smtp_load: message {i}: {e}");
                    }
                }
            });
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    println!(
        "n={} sessions={} size={} failed={failed} accept_s={secs:.2} accept_per_s={:.1}",
        a.n,
        a.sessions,
        a.size,
        (a.n - failed) as f64 / secs
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
