//! Where the logs go (`[log] target`): a file every process appends to, and the system log
//! for `qms start --daemon`, whose terminal is gone.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn a_log_file_gets_every_processs_lines() {
    let mut inst = Instance::new("", "[log]\ntarget = \"./mail.log\"\n");
    inst.start();
    smtp_send(
        inst.smtp_port,
        "a@remote.test",
        &["alice@example.test"],
        "Subject: f\r\n\r\nx\r\n",
        "",
    );
    let file = inst.dir.join("mail.log");
    wait_for(
        "the delivery in the log file",
        Duration::from_secs(30),
        || std::fs::read_to_string(&file).is_ok_and(|l| l.contains("status=sent")),
    );
    let lines = std::fs::read_to_string(&file).unwrap();
    for role in ["qms/smtpd[", "qms/router[", "qms/deliver/local["] {
        assert!(lines.contains(role), "{role} in {lines}");
    }
    assert!(!inst.log().contains("status=sent"), "nothing on stderr");
}

/// Issue #14: `qms start --daemon` must not lose its logs.
#[test]
fn a_detached_instance_logs_to_the_system_log() {
    let inst = Instance::new("", "");
    let (sock, sock_path) = fake_syslog(&inst.dir);
    // Read as a syslog daemon does, all the time, so that no line is dropped.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            let since = std::time::Instant::now();
            while since.elapsed() < Duration::from_secs(60) {
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        let mut s = seen.lock().unwrap();
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                        s.push('\n');
                        if s.contains("event=stop") {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return,
                }
            }
        })
    };
    let status = Command::new(test_bin())
        .arg("-c")
        .arg(&inst.config)
        .args(["start", "--daemon"])
        .env("QMS_SYSLOG_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let port = inst.smtp_port;
    wait_for("smtpd to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    smtp_send(
        port,
        "a@remote.test",
        &["alice@example.test"],
        "Subject: d\r\n\r\nx\r\n",
        "",
    );
    wait_for(
        "the delivery in the system log",
        Duration::from_secs(30),
        || seen.lock().unwrap().contains("status=sent"),
    );
    assert!(inst.qms(&["stop"]).status.success());
    let _ = reader.join();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.contains("<22>qms/smtpd[") && seen.contains("<22>qms/master["),
        "{seen}"
    );
}
