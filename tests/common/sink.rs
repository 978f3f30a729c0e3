//! Peers for outgoing tests: Postfix's smtp-sink as a receiving server, and an instance
//! that relays chosen domains to loopback ports.

use super::*;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

/// Postfix's smtp-sink on 127.0.0.1 (or `ip`), dumping every transaction into a directory.
pub struct Sink {
    child: Child,
    pub dir: PathBuf,
}

impl Sink {
    pub fn start(inst: &Instance, name: &str, ip: &str, port: u16, opts: &[&str]) -> Sink {
        let dir = inst.dir.join(format!("sink-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        inst.own();
        let log = std::fs::File::create(inst.dir.join(format!("sink-{name}.log"))).unwrap();
        let mut cmd = Command::new("/usr/sbin/smtp-sink");
        if is_root() {
            cmd.args(["-u", "nobody"]);
        }
        let mut child = cmd
            .args(opts)
            .arg("-v")
            .arg("-d")
            .arg(format!("{}/m.", dir.display()))
            .arg(format!("{ip}:{port}"))
            .arg("100")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        // This sink, not whatever else took the port meanwhile (a test's mail would go to
        // that stranger instead).
        wait_for("smtp-sink to listen", Duration::from_secs(10), || {
            let ended = child.try_wait().ok().flatten();
            assert!(
                ended.is_none(),
                "smtp-sink on {ip}:{port} ended ({ended:?}): {}",
                std::fs::read_to_string(inst.dir.join(format!("sink-{name}.log")))
                    .unwrap_or_default()
            );
            listens(child.id(), ip.parse().expect("an IPv4 address"), port)
        });
        Sink { child, dir }
    }

    pub fn messages(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default();
        v.retain(|m| m.contains("\n\n") || m.ends_with('\n'));
        v
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn relay_instance(routes: &[(&str, u16)], extra: &str) -> Instance {
    let mut r = String::from("[routes]\n");
    for (domain, port) in routes {
        r.push_str(&format!("\"{domain}\" = \"smtp:[127.0.0.1]:{port}\"\n"));
    }
    let cfg = format!("{r}{extra}");
    let inst = Instance::new("", &cfg);
    let relays: Vec<String> = routes.iter().map(|(d, _)| format!("\"{d}\"")).collect();
    inst.edit_config(
        "local = [\"example.test\"]",
        &format!(
            "local = [\"example.test\"]\nrelay = [{}]",
            relays.join(", ")
        ),
    );
    inst
}

/// A started instance that relays ok.test to a sink taking everything and bad.test to one
/// refusing every recipient, the reports of tracked mail coming back to the Maildir of
/// bounces@example.test (`dsnproc` reads it); `tracking` is added to its [tracking] section.
/// Returns the instance and the two sinks (ok, bad).
pub fn tracked_loop(tracking: &str) -> (Instance, Sink, Sink) {
    let (ok_port, bad_port) = (free_port(), free_port());
    let mut inst = relay_instance(
        &[("ok.test", ok_port), ("bad.test", bad_port)],
        &format!("[tracking]\nenvelope_maildir = \"mail/bounces\"\n{tracking}"),
    );
    inst.edit_config(
        "[mailboxes]\n",
        "[mailboxes]\n\"bounces@example.test\" = { maildir = \"mail/bounces\" }\n",
    );
    let ok = Sink::start(&inst, "ok", "127.0.0.1", ok_port, &[]);
    let bad = Sink::start(&inst, "bad", "127.0.0.1", bad_port, &["-f", "RCPT"]);
    inst.start();
    (inst, ok, bad)
}
