//! A qms instance of the tests: its own directory, spool, ports and config, started and
//! stopped through the real binary, and what a test asks of it (mailboxes, queue, log).

use super::*;

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
            let user = nix::unistd::User::from_name("nobody").unwrap();
            let group = nix::unistd::Group::from_name("nogroup").unwrap();
            let (user, group) = (
                user.expect("a user nobody"),
                group.expect("a group nogroup"),
            );
            chown_tree(&self.dir, user.uid.as_raw(), group.gid.as_raw());
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

    /// Makes `domains` local too, each with a mailbox carol@ delivered to `mail/carol`: a
    /// peer the tests send to.
    pub fn carol_at(&self, domains: &[&str]) {
        let quoted: Vec<String> = domains.iter().map(|d| format!("\"{d}\"")).collect();
        self.edit_config(
            "local = [\"example.test\"]",
            &format!("local = [\"example.test\", {}]", quoted.join(", ")),
        );
        let boxes: String = domains
            .iter()
            .map(|d| format!("\"carol@{d}\" = {{ maildir = \"mail/carol\" }}\n"))
            .collect();
        self.edit_config("[mailboxes]\n", &format!("[mailboxes]\n{boxes}"));
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

/// `chown -R` that never follows a link and skips what vanishes during the walk: a running
/// instance renames and removes its own files, and `chown -R` then failed the test.
fn chown_tree(path: &Path, uid: u32, gid: u32) {
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    match std::os::unix::fs::lchown(path, Some(uid), Some(gid)) {
        Err(e) if gone(&e) => return,
        r => r.unwrap_or_else(|e| panic!("chown {}: {e}", path.display())),
    }
    if !std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        return;
    }
    let entries = match std::fs::read_dir(path) {
        Err(e) if gone(&e) => return,
        r => r.unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
    };
    for entry in entries {
        match entry {
            Ok(e) => chown_tree(&e.path(), uid, gid),
            Err(e) if gone(&e) => {}
            Err(e) => panic!("read {}: {e}", path.display()),
        }
    }
}
