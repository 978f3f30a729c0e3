//! Hostile input from SMTP clients (issue #11): what a client sends never becomes a field of
//! a report qms writes, a raw control byte in its log, or a bounce to a forged sender.

mod common;
use common::*;
use std::time::Duration;

/// Finding 1: ENVID and ORCPT decoded to CR/LF were written into qms's own reports.
#[test]
fn envid_and_orcpt_with_line_ends_are_refused_and_reports_carry_them_as_xtext() {
    let mut inst = Instance::new("", "[routes]\n\"fail@example.test\" = \"pipe:exit 1\"\n");
    inst.start();
    let script = r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30)
s.ehlo("client.test")
code, text = s.docmd("MAIL FROM:<bob@example.test> ENVID=abc+0D+0AX-Injected:+20yes")
assert code == 501 and b"5.5.4" in text, (code, text)
code, text = s.docmd("MAIL FROM:<bob@example.test> ENVID=ok+20id")
assert code == 250, (code, text)
code, text = s.docmd("RCPT TO:<fail@example.test> ORCPT=rfc822;r+0D+0AAction:+20delivered")
assert code == 501 and b"5.5.4" in text, (code, text)
code, text = s.docmd("RCPT TO:<fail@example.test> NOTIFY=FAILURE ORCPT=rfc822;fail+2Bx@example.test")
assert code == 250, (code, text)
code, text = s.data(b"Subject: will fail\r\n\r\nx\r\n")
assert code == 250, (code, text)
s.quit()
"#;
    let (ok, out) = python(script, &[inst.smtp_port.to_string()]);
    assert!(ok, "{out}");
    wait_for("the report to bob", Duration::from_secs(30), || {
        inst.count_new("bob") == 1
    });
    let report = &inst.read_maildir("bob")[0];
    assert!(report.contains("Original-Envelope-Id: ok+20id"), "{report}");
    assert!(
        report.contains("Original-Recipient: rfc822; fail+2Bx@example.test"),
        "{report}"
    );
    assert!(
        !report.contains("X-Injected") && !report.contains("Action: delivered"),
        "{report}"
    );
    assert!(
        report.contains("Action: failed") && report.contains("Status: 5."),
        "{report}"
    );
}

/// Finding 7: control bytes from HELO reached the log raw, and quoted local parts were
/// logged unquoted, so a sender could forge fields of a log line.
#[test]
fn control_bytes_and_forged_fields_never_reach_the_log_raw() {
    let mut inst = Instance::new("", "");
    inst.start();
    let script = r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30)
s.ehlo("evil\x1b]0;owned\x07\x1b[2J")
s.sendmail('"x status=sent relay=bank.test"@remote.test', ["alice@example.test"], b"Subject: log\r\n\r\nx\r\n")
s.quit()
"#;
    let (ok, out) = python(script, &[inst.smtp_port.to_string()]);
    assert!(ok, "{out}");
    wait_for("the delivery", Duration::from_secs(30), || {
        inst.count_new("alice") == 1
    });
    wait_for("the delivery's log line", Duration::from_secs(30), || {
        inst.log().contains("relay=local")
    });
    let log = inst.log();
    assert!(
        !log.chars().any(|c| c.is_control() && c != '\n'),
        "a control character reached the log"
    );
    assert!(log.contains("\\x1b]0;owned\\x07"), "{log}");
    assert!(
        !log.contains("relay=bank.test\"@"),
        "a sender's local part was logged unquoted: {log}"
    );
}

/// Finding 8: recipients routed to `error:` were accepted, then bounced to a sender who may
/// be forged.
#[test]
fn error_routes_are_refused_at_rcpt_with_their_text() {
    let mut inst = Instance::new(
        "",
        "[routes]\n\"spam.test\" = \"error:no mail for this domain\"\n\"gone@example.test\" = \"error:moved away\"\n",
    );
    inst.edit_config(
        "local = [\"example.test\"]",
        "local = [\"example.test\"]\nrelay = [\"spam.test\"]",
    );
    inst.start();
    let script = r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30)
s.ehlo("client.test")
s.mail("forged@victim.test")
for rcpt, text in [("x@spam.test", b"no mail for this domain"), ("gone@example.test", b"moved away")]:
    code, reply = s.rcpt(rcpt)
    assert code == 550 and text in reply, (rcpt, code, reply)
s.quit()
"#;
    let (ok, out) = python(script, &[inst.smtp_port.to_string()]);
    assert!(ok, "{out}");
    assert!(inst.queue_json().is_empty());
}

/// A small ext4 file system of its own, loop-mounted over `dir` until dropped.
struct SmallFs {
    dir: std::path::PathBuf,
    image: std::path::PathBuf,
}

impl SmallFs {
    fn mount(dir: &std::path::Path, megabytes: u64) -> SmallFs {
        use std::process::Command;
        let image = dir.with_extension("img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(megabytes << 20).unwrap();
        let ok = |c: &mut Command| assert!(c.output().unwrap().status.success(), "{c:?}");
        ok(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&image));
        std::fs::create_dir_all(dir).unwrap();
        ok(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(dir));
        ok(Command::new("chown").args(["nobody:nogroup"]).arg(dir));
        SmallFs {
            dir: dir.to_path_buf(),
            image,
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Findings 4 and 5: smtpd filled the disk to 100% (and then the router and tracker failed),
/// and delivered messages kept their space. Now new mail is refused with 452 4.3.1 before the
/// reserve is touched, and every message accepted is delivered.
#[test]
fn a_full_spool_refuses_new_mail_and_delivers_what_it_accepted() {
    if !is_root() {
        eprintln!("needs root: mounts a file system");
        return;
    }
    let mut inst = Instance::new(
        "",
        "[limits]\nmessage_size = 1000000\n[queues.local]\nworkers = 0\n",
    );
    let _fs = SmallFs::mount(&inst.spool(), 24);
    inst.start();
    let script = r#"
import smtplib, sys
body = b"Subject: fill\r\n\r\n" + (b"y" * 998 + b"\r\n") * 400
accepted = 0
for i in range(200):
    s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=60)
    try:
        s.sendmail("bob@remote.test", ["alice@example.test"], body)
        accepted += 1
    except smtplib.SMTPSenderRefused as e:
        assert e.smtp_code == 452 and b"4.3.1" in e.smtp_error, e
        print(accepted)
        sys.exit(0)
    finally:
        s.close()
raise SystemExit("never refused")
"#;
    let (ok, out) = python(script, &[inst.smtp_port.to_string()]);
    assert!(ok, "{out}");
    let accepted: usize = out.trim().parse().unwrap();
    assert!(accepted >= 5, "refused too early: {accepted}");
    let log = inst.log();
    assert!(
        !log.contains("No space left"),
        "the reserve was used up: {log}"
    );
    // Deliveries start: everything accepted arrives, and the space comes back.
    inst.edit_config(
        "[queues.local]\nworkers = 0\n",
        "[queues.local]\nworkers = 1\n",
    );
    let pid = std::fs::read_to_string(inst.spool().join("run/qms.pid")).unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid.trim().parse().unwrap()),
        nix::sys::signal::Signal::SIGHUP,
    );
    wait_for(
        "every accepted message delivered",
        Duration::from_secs(60),
        || inst.count_new("alice") == accepted,
    );
    wait_for("the spool's space back", Duration::from_secs(30), || {
        let st = nix::sys::statvfs::statvfs(&inst.spool()).unwrap();
        let used = (st.blocks() - st.blocks_free()) * st.fragment_size();
        used < 4 << 20
    });
}

/// Finding 2: every parallel AUTH attempt ran argon2 (19 MiB each), the lockout counted only
/// after the check. Now an attempt counts before it is checked: beyond the limit, attempts
/// are refused without a check.
#[test]
fn parallel_auth_attempts_beyond_the_lockout_are_refused_unchecked() {
    let mut inst = Instance::new(
        "",
        "[auth]\nusers = \"users\"\nplaintext_loopback = true\nmax_failures = 3\n",
    );
    std::fs::write(inst.dir.join("users"), passwd_line("alice", "right")).unwrap();
    inst.own();
    inst.start();
    let script = r#"
import smtplib, sys, threading, base64
port = int(sys.argv[1])
codes = []
lock = threading.Lock()
def attempt():
    try:
        s = smtplib.SMTP("127.0.0.1", port, timeout=60)
        s.ehlo("client.test")
        token = base64.b64encode(b"\0alice\0wrong").decode()
        code, _ = s.docmd("AUTH PLAIN " + token)
        s.close()
    except smtplib.SMTPServerDisconnected:
        code = 421
    with lock:
        codes.append(code)
ts = [threading.Thread(target=attempt) for _ in range(40)]
[t.start() for t in ts]
[t.join() for t in ts]
print(" ".join(str(c) for c in sorted(codes)))
"#;
    let (ok, out) = python(script, &[inst.smtp_port.to_string()]);
    assert!(ok, "{out}");
    let codes: Vec<u32> = out.split_whitespace().map(|c| c.parse().unwrap()).collect();
    assert_eq!(codes.len(), 40);
    assert!(
        codes.iter().all(|c| [535, 421, 454].contains(c)),
        "{codes:?}"
    );
    let checked = inst.log().matches("status=auth-failed").count();
    assert!(
        checked <= 3,
        "{checked} attempts were checked, the limit is 3: {codes:?}"
    );
    assert!(
        codes.iter().filter(|c| **c == 535).count() <= 3,
        "{codes:?}"
    );
}

/// Finding 6: idle connections from a few addresses took every slot, and a client that
/// trickled bytes kept its session for ever. Now a network has a limit of its own, the last
/// slots are kept for clients with none open, and a session has a lifetime.
#[test]
fn a_few_networks_cannot_take_every_slot_and_sessions_end() {
    let mut inst = Instance::new(
        "",
        "[limits]\nconnections = 40\nconnections_per_client = 30\nconnections_per_network = 30\nsession_lifetime = 3\n",
    );
    inst.start();
    let script = r#"
import socket, sys, time
port = int(sys.argv[1])
def connect(src):
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s, s.recv(200)
held = []
def fill(net):
    # Idle connections from ten addresses of one /24 until the server says no.
    for i in range(40):
        s, greeting = connect("%s.%d" % (net, 1 + i % 10))
        if not greeting.startswith(b"220"):
            return len(held), greeting
        held.append(s)
    raise SystemExit("never refused " + net)
n, why = fill("127.0.2")
assert n == 30 and b"your network" in why, (n, why)
n, why = fill("127.0.3")
assert b"421" in why, (n, why)
# A client with no connection open still gets in.
s, greeting = connect("127.0.4.1")
assert greeting.startswith(b"220"), greeting
# A session that keeps talking still ends at its lifetime.
end = time.time() + 30
closed = False
while time.time() < end and not closed:
    try:
        s.sendall(b"NOOP\r\n")
        if s.recv(200) == b"":
            closed = True
        time.sleep(0.3)
    except OSError:
        closed = True
assert closed, "the session outlived its lifetime"
"#;
    let (ok, out) = python(script, &[inst.smtp_port.to_string()]);
    assert!(ok, "{out}");
    assert!(
        inst.log().contains("session lifetime reached"),
        "{}",
        inst.log()
    );
}

/// Finding 3: smtpd held whole messages in memory. Now DATA and BDAT go straight into the
/// spool file: most of a large message is on disk before its end has been sent, and it is
/// delivered byte for byte (dot-stuffing undone, a CRLF split across BDAT chunks kept).
#[test]
fn large_messages_stream_into_the_spool_and_arrive_byte_for_byte() {
    let mut inst = Instance::new("", "[limits]\nmessage_size = 40000000\n");
    inst.start();
    let spool_msg = inst.spool().join("msg");
    let script = r#"
import socket, sys, os, time, hashlib
port, msgdir, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
lines = []
for i in range(200000):
    lines.append((".dot %d " % i if i % 7 == 0 else "line %d " % i).encode() + b"x" * (i % 90))
body = b"Subject: big " + mode.encode() + b"\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
s = socket.create_connection(("127.0.0.1", port), timeout=60)
f = s.makefile("rb")
def reply():
    line = f.readline()
    while line[3:4] == b"-":
        line = f.readline()
    return line
reply()
s.sendall(b"EHLO client.test\r\n"); reply()
s.sendall(b"MAIL FROM:<bob@remote.test>\r\n"); assert reply().startswith(b"250")
s.sendall(b"RCPT TO:<alice@example.test>\r\n"); assert reply().startswith(b"250")
def spooled():
    # A message file, or a one-file job being written beside its queue's jobs: in a new
    # file, or in a free one of the queue's pool where it lies (emptied before we start).
    files = [os.path.join(msgdir, n) for n in os.listdir(msgdir) if not n.startswith(".")]
    queues = os.path.join(os.path.dirname(msgdir), "queue")
    for q in os.listdir(queues):
        files += [os.path.join(queues, q, n) for n in os.listdir(os.path.join(queues, q))
                  if n.endswith(".tmp") or n.startswith(".free.")]
    sizes = [0]
    for f in files:
        try:
            sizes.append(os.path.getsize(f))
        except FileNotFoundError:
            pass
    return max(sizes)
def wait_spooled(least):
    end = time.time() + 30
    while spooled() < least:
        assert time.time() < end, "the message is not being written to the spool: %d bytes" % spooled()
        time.sleep(0.05)
if mode == "data":
    s.sendall(b"DATA\r\n"); assert reply().startswith(b"354")
    stuffed = b"\r\n".join(b"." + l if l.startswith(b".") else l for l in body.split(b"\r\n"))
    s.sendall(stuffed[:-2])
    wait_spooled(len(body) // 2)
    s.sendall(b"\r\n.\r\n")
else:
    chunk = 1 << 20
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)]
    # A CRLF split across two chunks.
    cut = parts[0].index(b"\r\n", 1000) + 1
    parts = [parts[0][:cut], parts[0][cut:]] + parts[1:]
    for p in parts[:-1]:
        s.sendall(b"BDAT %d\r\n" % len(p) + p)
        assert reply().startswith(b"250")
    wait_spooled(len(body) // 2)
    s.sendall(b"BDAT %d LAST\r\n" % len(parts[-1]) + parts[-1])
r = reply()
assert r.startswith(b"250"), r
s.sendall(b"QUIT\r\n")
print(hashlib.sha256(body.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")).hexdigest())
"#;
    for (i, mode) in ["data", "bdat"].iter().enumerate() {
        // The pool's files hold nothing of the message before (a second after delivery they
        // are emptied): what grows in one now is this message being written.
        wait_for("the pool emptied", Duration::from_secs(30), || {
            let queues = inst.spool().join("queue");
            std::fs::read_dir(&queues).unwrap().flatten().all(|q| {
                std::fs::read_dir(q.path()).unwrap().flatten().all(|e| {
                    !e.file_name().to_string_lossy().starts_with(".free.")
                        || e.metadata().map_or(true, |m| m.len() < 1 << 16)
                })
            })
        });
        let (ok, out) = python(
            script,
            &[
                inst.smtp_port.to_string(),
                spool_msg.display().to_string(),
                mode.to_string(),
            ],
        );
        assert!(ok, "{mode}: {out}");
        wait_for("the large message", Duration::from_secs(60), || {
            inst.count_new("alice") == i + 1
        });
        let dir = inst.maildir("alice").join("new");
        let delivered = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| std::fs::read(e.path()).unwrap())
            .find(|m| {
                let subject = format!("Subject: big {mode}");
                m.windows(subject.len()).any(|w| w == subject.as_bytes())
            })
            .expect("the message");
        let at = delivered.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
        let got = sha256_hex(&delivered[at..]);
        assert_eq!(got, out.trim(), "{mode}: the body changed on the way");
    }
}

fn sha256_hex(data: &[u8]) -> String {
    let (ok, out) = {
        let mut p = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        p.stdin.take().unwrap().write_all(data).unwrap();
        let o = p.wait_with_output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    assert!(ok);
    out.split_whitespace().next().unwrap().to_string()
}
