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
mod postgres;
mod sink;
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
pub use postgres::Postgres;
#[allow(unused_imports)]
pub use sink::{relay_instance, tracked_loop, Sink};
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

pub struct Instance {
    pub dir: PathBuf,
    /// The qms binary this instance runs (see `install_bins`).
    pub bin: PathBuf,
    pub config: PathBuf,
    pub smtp_port: u16,
    pub submission_port: u16,
    child: Option<Child>,
}

static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Instance {
    /// A config with local domain example.test, mailboxes alice and bob, and `extra` TOML
    /// appended (sections of its own).
    pub fn new(top: &str, extra: &str) -> Instance {
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("qms-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let smtp_port = free_port();
        let submission_port = std::iter::repeat_with(free_port)
            .find(|p| *p != smtp_port)
            .unwrap();
        let user = if is_root() { "user = \"nobody\"\n" } else { "" };
        let text = format!(
            r#"spool = "spool"
hostname = "mx.example.test"
postmaster = "alice@example.test"
aliases = "aliases"
{user}{top}
[smtp]
listen = ["127.0.0.1:{smtp_port}"]
[submission]
listen = ["127.0.0.1:{submission_port}"]
[domains]
local = ["example.test"]
[mailboxes]
"alice@example.test" = {{ maildir = "mail/alice" }}
"bob@example.test" = {{ maildir = "mail/bob" }}
[scheduler]
busy_retry = 1
scan_interval = 2
{extra}
"#
        );
        let config = dir.join("qms.toml");
        std::fs::write(&config, text).unwrap();
        std::fs::write(dir.join("aliases"), "postmaster: alice\n").unwrap();
        let inst = Instance {
            dir,
            bin: test_bin(),
            config,
            smtp_port,
            submission_port,
            child: None,
        };
        inst.own();
        inst
    }

    /// As root, hands the test directory to `nobody`, as an installed spool belongs to qms's user.
    pub fn own(&self) {
        if is_root() {
            let st = Command::new("chown")
                .args(["-R", "nobody:nogroup"])
                .arg(&self.dir)
                .status()
                .unwrap();
            assert!(st.success());
        }
    }

    /// Copies qms and qms-postdrop into a directory of their own (root's, mode 0755), so a
    /// test can make them set-id and run `set-permissions` on them without touching the
    /// build's; the instance then runs that qms.
    pub fn install_bins(&mut self) -> PathBuf {
        let dir = self.dir.with_extension("bin");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for (from, name) in [
            (test_bin(), "qms"),
            (PathBuf::from(POSTDROP), "qms-postdrop"),
        ] {
            let to = dir.join(name);
            std::fs::copy(&from, &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        self.bin = dir.join("qms");
        dir
    }

    /// Runs the instance as `user` (a system account of its own) instead of nobody.
    pub fn use_qms_user(&self, user: &SystemUser) {
        let want = format!("user = \"{}\"", user.name);
        if !std::fs::read_to_string(&self.config)
            .unwrap()
            .contains(&want)
        {
            self.edit_config("user = \"nobody\"", &want);
        }
        let st = Command::new("chown")
            .args(["-R", &format!("{0}:{0}", user.name)])
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Rewrites the config file, replacing `from` (which must be there) with `to`.
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        assert!(text.contains(from), "the config has no {from:?}");
        // Replaced in one rename: processes read the config while a test changes it.
        let tmp = self.config.with_extension("toml.new");
        std::fs::write(&tmp, text.replace(from, to)).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    pub fn spool(&self) -> PathBuf {
        self.dir.join("spool")
    }

    pub fn start(&mut self) {
        self.start_under(&[]);
    }

    /// Starts the instance as the last arguments of `wrapper` (`strace -f -o FILE`, say).
    /// A port another test took between `free_port` and the bind is replaced and the start
    /// tried again.
    pub fn start_under(&mut self, wrapper: &[&str]) {
        for _ in 0..5 {
            if self.try_start(wrapper) {
                wait_for("the workers to start", Duration::from_secs(20), || {
                    std::fs::read_to_string(self.spool().join("run/status.json"))
                        .is_ok_and(|s| !s.contains("null"))
                });
                return;
            }
            // Two new ports, different from each other and from the old ones.
            let old = [self.smtp_port, self.submission_port];
            let smtp = std::iter::repeat_with(free_port)
                .find(|p| !old.contains(p))
                .unwrap();
            let submission = std::iter::repeat_with(free_port)
                .find(|p| !old.contains(p) && *p != smtp)
                .unwrap();
            let text = std::fs::read_to_string(&self.config)
                .unwrap()
                .replace(&format!("127.0.0.1:{}\"", old[0]), "127.0.0.1:\u{0}smtp\"")
                .replace(
                    &format!("127.0.0.1:{}\"", old[1]),
                    "127.0.0.1:\u{0}submission\"",
                )
                .replace("\u{0}smtp", &smtp.to_string())
                .replace("\u{0}submission", &submission.to_string());
            std::fs::write(&self.config, text).unwrap();
            (self.smtp_port, self.submission_port) = (smtp, submission);
        }
        panic!("qms did not start: {}", self.log());
    }

    /// One start; false when qms gave up because a port of its own was taken.
    fn try_start(&mut self, wrapper: &[&str]) -> bool {
        let log = std::fs::File::create(self.dir.join("qms.log")).unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let child = cmd
            .arg("-c")
            .arg(&self.config)
            .arg("start")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.smtp_port;
        let mut ended = false;
        // Listening by this instance, not by whatever else took the port meanwhile.
        wait_for("smtpd to listen", Duration::from_secs(20), || {
            let child = self.child.as_mut();
            ended = child.is_some_and(|c| c.try_wait().ok().flatten().is_some());
            ended
                || self
                    .child
                    .as_ref()
                    .is_some_and(|c| listens(c.id(), std::net::Ipv4Addr::LOCALHOST, port))
        });
        if ended {
            self.child = None;
            let log = self.log();
            assert!(log.contains("Address already in use"), "qms ended: {log}");
            return false;
        }
        true
    }

    /// SIGHUP to the supervisor: the config is read again and workers scaled.
    pub fn reload(&self) {
        let pid: i32 = std::fs::read_to_string(self.spool().join("run/qms.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    }

    /// Stops the instance with `qms stop` (for a supervisor run under another program).
    pub fn stop_gently(&mut self) {
        let out = self.qms(&["stop"]);
        assert!(
            out.status.success(),
            "qms stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    /// SIGKILLs the supervisor and every role together, as a crash of the machine's qms
    /// would, and waits until none is left.
    pub fn kill_all(&mut self) {
        let pattern = self.config.display().to_string();
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &pattern])
            .status();
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        wait_for(
            "every process of the instance gone",
            Duration::from_secs(20),
            || {
                let _ = Command::new("pkill")
                    .args(["-KILL", "-f", &pattern])
                    .status();
                !Command::new("pgrep")
                    .args(["-f", &pattern])
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("qms.log")).unwrap_or_default()
    }

    pub fn qms(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `qms sendmail ARGS` with `input` on stdin.
    pub fn sendmail(&self, args: &[&str], input: &[u8]) -> Output {
        self.sendmail_cmd(
            Command::new(&self.bin)
                .arg("-c")
                .arg(&self.config)
                .arg("sendmail")
                .args(args),
            input,
        )
    }

    pub fn sendmail_cmd(&self, cmd: &mut Command, input: &[u8]) -> Output {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    pub fn maildir(&self, user: &str) -> PathBuf {
        self.dir.join("mail").join(user)
    }

    /// The messages in a Maildir's new/, read back with Python's mailbox module.
    pub fn read_maildir(&self, user: &str) -> Vec<String> {
        let script = "import mailbox,sys,json\nmb=mailbox.Maildir(sys.argv[1],create=False)\nprint(json.dumps([m.as_string() for k,m in sorted(mb.items())]))";
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(self.maildir(user))
            .output()
            .unwrap();
        if !out.status.success() {
            return Vec::new();
        }
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    pub fn count_new(&self, user: &str) -> usize {
        std::fs::read_dir(self.maildir(user).join("new"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn queue_json(&self) -> Vec<serde_json::Value> {
        let out = self.qms(&["queue", "list", "--json"]);
        assert!(
            out.status.success(),
            "queue list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Files in a spool directory (relative to the spool), as `ls` shows them: without the
    /// dot files (jobs being written, files kept for reuse).
    pub fn files(&self, sub: &str) -> Vec<String> {
        let mut v = self.all_files(sub);
        v.retain(|n| !n.starts_with('.'));
        v
    }

    /// Every file in a spool directory, dot files too.
    pub fn all_files(&self, sub: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.spool().join(sub))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Writes an executable script into the test directory.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        self.own();
        p
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.stop();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
            let _ = std::fs::remove_dir_all(self.dir.with_extension("bin"));
        }
    }
}

/// Each of the messages `tok-0-` … `tok-{n-1}-` (as `send_many` makes them) is there once.
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

/// Runs openssl with `args` in `dir`; the test fails if it does.
pub fn openssl(args: &[&str], dir: &Path) {
    let ok = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "openssl {args:?}");
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

/// A self-signed certificate and key (cert.pem, key.pem) in `dir`.
pub fn make_cert(dir: &Path, cn: &str) {
    let subject = format!("/CN={cn}");
    openssl(
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &subject,
            "-keyout", "key.pem", "-out", "cert.pem",
        ],
        dir,
    );
}

/// A certificate authority (ca.pem) and a server certificate it signed (cert.pem, key.pem)
/// for `cn`, 127.0.0.1 and localhost: what a client that verifies can be made to trust.
pub fn make_ca_cert(dir: &Path, cn: &str) {
    make_ca_cert_with(dir, cn, &[]);
}

/// As `make_ca_cert`, the certificate also naming `more` hosts.
pub fn make_ca_cert_with(dir: &Path, cn: &str, more: &[&str]) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=qms test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        dir,
    );
    let subject = format!("/CN={cn}");
    openssl(
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", &subject, "-keyout", "key.pem",
            "-out", "req.csr",
        ],
        dir,
    );
    std::fs::write(
        dir.join("san.ext"),
        format!(
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:{cn}{}\n",
            more.iter().map(|n| format!(",DNS:{n}")).collect::<String>()
        ),
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "req.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "cert.pem",
        ],
        dir,
    );
}

/// A peer qms taking mail for `domains` into carol's Maildir over TLS, with a certificate
/// from a test CA naming `names`, served with the CA's certificate after it (as DANE-TA
/// needs).
pub fn tls_peer(domains: &[&str], names: &[&str]) -> Instance {
    let mut peer = Instance::new("", "[tls]\ncert = \"chain.pem\"\nkey = \"key.pem\"\n");
    let quoted: Vec<String> = domains.iter().map(|d| format!("\"{d}\"")).collect();
    peer.edit_config(
        "local = [\"example.test\"]",
        &format!("local = [\"example.test\", {}]", quoted.join(", ")),
    );
    let boxes: String = domains
        .iter()
        .map(|d| format!("\"carol@{d}\" = {{ maildir = \"mail/carol\" }}\n"))
        .collect();
    peer.edit_config("[mailboxes]\n", &format!("[mailboxes]\n{boxes}"));
    make_ca_cert_with(&peer.dir, names[0], &names[1..]);
    let chain = [
        std::fs::read(peer.dir.join("cert.pem")).unwrap(),
        std::fs::read(peer.dir.join("ca.pem")).unwrap(),
    ]
    .concat();
    std::fs::write(peer.dir.join("chain.pem"), chain).unwrap();
    peer.own();
    peer.start();
    peer
}

/// Sends one message from alice@example.test to carol at each of `domains` (the mailboxes
/// `tls_peer` makes).
pub fn send_to_carols(inst: &Instance, domains: &[&str], subject: &str) {
    let to: Vec<String> = domains.iter().map(|d| format!("carol@{d}")).collect();
    let to: Vec<&str> = to.iter().map(String::as_str).collect();
    smtp_send(
        inst.smtp_port,
        "alice@example.test",
        &to,
        &format!("Subject: {subject}\r\n\r\nx\r\n"),
        "",
    );
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
