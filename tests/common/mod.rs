//! Test harness: a qms instance on its own spool and ports, driven through the real binary.
#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod audit;
mod client;
mod dnssec;
mod dovecot;
mod installed;
mod instance;
mod postgres;
mod sink;
mod tls;
mod users;
#[allow(unused_imports)]
pub use audit::{audit, strace_args};
#[allow(unused_imports)]
pub use client::SmtpClient;
#[allow(unused_imports)]
pub use dnssec::{cert_sha256, signed_dns, spki_sha256, SignedDns};
#[allow(unused_imports)]
pub use dovecot::Dovecot;
#[allow(unused_imports)]
pub use installed::{
    as_user_with_system_config, drop_box, installed, status_ids, text, write_aliases,
};
pub use instance::Instance;
#[allow(unused_imports)]
pub use postgres::Postgres;
#[allow(unused_imports)]
pub use sink::{relay_instance, tracked_loop, Sink};
#[allow(unused_imports)]
pub use tls::{make_ca_cert, make_ca_cert_with, make_cert, openssl, send_to_carols, tls_peer};
#[allow(unused_imports)]
pub use users::{as_user, in_system_config, SystemUser};

pub const BIN: &str = env!("CARGO_BIN_EXE_qms");
pub const POSTDROP: &str = env!("CARGO_BIN_EXE_qms-postdrop");

/// The qms binary the instances run: `QMS_TEST_BIN` when set (to run a test against an older
/// build and watch it fail), else this build's.
pub fn test_bin() -> PathBuf {
    std::env::var_os("QMS_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BIN))
}

/// A loopback port nothing listens on, never one this test process was given before: the
/// tests of one file run at once, and a port chosen by one but not yet bound must not be
/// chosen by another (a sink would then listen nowhere and the mail go to a stranger).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Whether process `pid` or one of its descendants holds the socket listening on `ip`:`port`
/// (not merely whether something listens there): read from /proc/net/tcp and the processes'
/// descriptors.
pub fn listens(pid: u32, ip: std::net::Ipv4Addr, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    // Fields: sl local_address rem_address st ... inode (the tenth); 0A is LISTEN.
    let local = format!("{:08X}:{port:04X}", u32::from_le_bytes(ip.octets()));
    let Some(inode) = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| f[9].to_string())
    }) else {
        return false;
    };
    let socket = format!("socket:[{inode}]");
    family(pid).into_iter().any(|p| {
        std::fs::read_dir(format!("/proc/{p}/fd")).is_ok_and(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == socket.as_str())
            })
        })
    })
}

/// `pid` and its descendants.
fn family(pid: u32) -> Vec<u32> {
    // Each process's parent: the second field after the name's ')' in /proc/PID/stat.
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let p: u32 = e.file_name().to_str()?.parse().ok()?;
                    let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                    let after = &stat[stat.rfind(')')? + 1..];
                    Some((p, after.split_whitespace().nth(1)?.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut family = vec![pid];
    let mut i = 0;
    while i < family.len() {
        let parent = family[i];
        family.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    family
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Waits for `cond` to hold, up to `limit`; panics with `what` if it never does.
pub fn wait_for(what: &str, limit: Duration, cond: impl FnMut() -> bool) {
    wait_showing(what, limit, &[], cond);
}

/// [`wait_for`], and on a timeout the end of each instance's log in the message (what CI
/// shows of a failure is all there is to read).
pub fn wait_showing(
    what: &str,
    limit: Duration,
    logs: &[&Instance],
    mut cond: impl FnMut() -> bool,
) {
    let end = Instant::now() + limit;
    while !cond() {
        if Instant::now() >= end {
            let mut tails = String::new();
            for inst in logs {
                let log = inst.log();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                tails.push_str(&format!("\n--- {}:\n{tail}", inst.dir.display()));
            }
            panic!("timed out after {limit:?} waiting for {what}{tails}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A job file read as JSON, and its message when the job carries it in its own file
/// (`message_at`: one file per message, smtpd's direct route).
pub fn read_job_file(path: &Path) -> (serde_json::Value, Option<Vec<u8>>) {
    let data = std::fs::read(path).unwrap();
    let job: serde_json::Value = serde_json::Deserializer::from_slice(&data)
        .into_iter()
        .next()
        .expect("a job file starts with a job")
        .expect("the job is whole JSON");
    let message = job["message_at"]
        .as_u64()
        .map(|at| data[at as usize..].to_vec());
    (job, message)
}

/// Writes a job file back, changed: a one-file job's message stays where its job says.
pub fn write_job_file(path: &Path, job: &serde_json::Value, message: Option<&[u8]>) {
    let mut data = job.to_string().into_bytes();
    if let (Some(m), Some(at)) = (message, job["message_at"].as_u64()) {
        assert!(
            data.len() < at as usize,
            "the changed job fits before its message"
        );
        data.resize(at as usize - 1, b' ');
        data.push(b'\n');
        data.extend_from_slice(m);
    }
    std::fs::write(path, data).unwrap();
}

/// Each of the messages `tok-0-` … `tok-{n-1}-` (as `send_many` makes them) is there once.
pub fn assert_each_once(msgs: &[String], n: usize) {
    for i in 0..n {
        let tok = format!("tok-{i}-");
        let found = msgs.iter().filter(|m| m.contains(&tok)).count();
        assert_eq!(found, 1, "message {i} was delivered {found} times");
    }
}

pub fn message(subject: &str, body: &str) -> Vec<u8> {
    format!("From: root@example.test\nTo: alice@example.test\nSubject: {subject}\n\n{body}\n")
        .into_bytes()
}

/// Injects messages 0..n with `sendmail` from `threads` threads at once; `make(i)` gives
/// message i's recipient and text. Every injection must succeed.
pub fn send_many(
    inst: &Instance,
    n: usize,
    threads: usize,
    make: impl Fn(usize) -> (String, Vec<u8>) + Sync,
) {
    std::thread::scope(|s| {
        for t in 0..threads {
            let make = &make;
            s.spawn(move || {
                for i in (t..n).step_by(threads) {
                    let (to, msg) = make(i);
                    let out = inst.sendmail(&[&to], &msg);
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            });
        }
    });
}

/// Runs a Python script with arguments: whether it succeeded, and what it printed.
pub fn python(script: &str, args: &[String]) -> (bool, String) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs a dkimpy `check` (Python code that ends with a print, over `msg` and a `dnsfunc`
/// that answers with `records`, TXT values by name) and returns what it printed.
pub fn dkimpy(check: &str, msg: &str, records: &[(&str, &str)]) -> String {
    let script = format!(
        "import sys, json, dkim\nmsg = open(sys.argv[1], \"rb\").read()\nrecords = json.loads(sys.argv[2])\ndef dnsfunc(name, timeout=5):\n    return records.get(name.decode().rstrip(\".\"), \"\").encode()\n{check}"
    );
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("dkimpy-msg-{}-{n}", std::process::id()));
    std::fs::write(&path, msg).unwrap();
    let map: serde_json::Map<String, serde_json::Value> = records
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    let (ok, out) = python(
        &script,
        &[
            path.display().to_string(),
            serde_json::Value::Object(map).to_string(),
        ],
    );
    let _ = std::fs::remove_file(&path);
    assert!(ok, "{out}");
    out.trim().to_string()
}

/// Sends one message with Python's smtplib and asserts every recipient was accepted.
/// `params` holds MAIL options (RET=, ENVID=) and RCPT options (NOTIFY=, ORCPT=).
pub fn smtp_send(port: u16, from: &str, to: &[&str], body: &str, params: &str) {
    let script = r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30)
s.ehlo("client.test")
opts = sys.argv[5].split() if sys.argv[5] else []
mail_opts = [o for o in opts if o.startswith(("RET=", "ENVID="))]
rcpt_opts = [o for o in opts if not o.startswith(("RET=", "ENVID="))]
refused = s.sendmail(sys.argv[2], sys.argv[4].split(","), sys.argv[3], mail_options=mail_opts, rcpt_options=rcpt_opts)
assert refused == {}, refused
s.quit()
"#;
    let args = [
        port.to_string(),
        from.to_string(),
        body.to_string(),
        to.join(","),
        params.to_string(),
    ];
    let (ok, out) = python(script, &args);
    assert!(ok, "{out}");
}

/// A datagram socket in `dir` that stands for /dev/log (`QMS_SYSLOG_SOCKET`), writable by
/// the mail system's user.
pub fn fake_syslog(dir: &Path) -> (std::os::unix::net::UnixDatagram, PathBuf) {
    let path = dir.join("syslog.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (sock, path)
}

/// The reply recorded for a recipient still in the queue.
pub fn queued_reply(inst: &Instance, who: &str) -> Option<String> {
    inst.queue_json().iter().find_map(|j| {
        j["recipients"]
            .as_array()?
            .iter()
            .find(|r| r["address"] == who)
            .and_then(|r| r["reply"].as_str().map(str::to_string))
    })
}

/// A `[auth] users` line for `user` with `password`, made by `qms passwd`.
pub fn passwd_line(user: &str, password: &str) -> Vec<u8> {
    let mut p = Command::new(BIN)
        .args(["passwd", user])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let line = p.wait_with_output().unwrap().stdout;
    assert!(String::from_utf8_lossy(&line).starts_with(&format!("{user}:$argon2")));
    line
}

/// SIGKILLs every process of `role` (`router`, `smtpd`, `tracker`, …) of this instance.
pub fn kill_role(inst: &Instance, role: &str) -> usize {
    let out = Command::new("pgrep")
        .args(["-f", &format!("{} {role}", inst.config.display())])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|pid| {
            Command::new("kill")
                .args(["-KILL", pid])
                .status()
                .is_ok_and(|s| s.success())
        })
        .count()
}

/// dnsmasq on a loopback port of its own, serving `records` (dnsmasq options such as
/// `--mx-host=…` or `--txt-record=…`) and nothing else; its log goes to the instance's directory.
pub fn dnsmasq(inst: &Instance, records: &[String]) -> (std::process::Child, u16) {
    let port = free_port();
    let mut cmd = std::process::Command::new("dnsmasq");
    cmd.args([
        "--no-daemon",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        "--conf-file=/dev/null",
        "--pid-file=",
    ])
    .arg(format!("--port={port}"))
    .args(records)
    .stdout(std::process::Stdio::null())
    .stderr(std::fs::File::create(inst.dir.join("dnsmasq.log")).unwrap());
    if is_root() {
        cmd.arg("--user=nobody");
    }
    let child = cmd.spawn().unwrap();
    wait_for("dnsmasq", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (child, port)
}

/// A `--txt-record` option for `dnsmasq`: the value cut into strings of 200 bytes, each
/// comma-separated part a string of its own, as a long DKIM key must be.
pub fn txt_record(name: &str, value: &str) -> String {
    let parts: Vec<String> = value
        .as_bytes()
        .chunks(200)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!("--txt-record={name},{}", parts.join(","))
}
