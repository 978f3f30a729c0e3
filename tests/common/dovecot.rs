//! A private Dovecot IMAP server on a loopback port (IMAPS only), with a CA of its own so
//! clients can check its certificate, and one user whose Maildir a test can fill.

use super::*;
use std::process::{Child, Command};
use std::time::Duration;

pub struct Dovecot {
    child: Child,
    dir: PathBuf,
    pub port: u16,
    /// The CA that signed the server's certificate (PEM).
    pub ca: PathBuf,
    /// The user's Maildir.
    pub maildir: PathBuf,
    /// Its LMTP service (RFC 2033), on 127.0.0.1.
    pub lmtp_port: u16,
    /// Its authentication socket, for `[auth] dovecot`.
    pub auth_socket: PathBuf,
    /// Its LMTP service's local socket.
    pub lmtp_socket: PathBuf,
}

impl Dovecot {
    /// Starts Dovecot under `dir/dovecot`, with `user` / `password`.
    pub fn start(dir: &Path, user: &str, password: &str) -> Dovecot {
        let d = dir.join("dovecot");
        std::fs::create_dir_all(d.join("run")).unwrap();
        super::make_ca_cert(&d, "127.0.0.1");
        let port = free_port();
        let lmtp_port = free_port();
        // As root, mail belongs to nobody; otherwise everything runs as the current user.
        let (owner, group) = if is_root() {
            ("nobody".to_string(), "nogroup".to_string())
        } else {
            let id = |f: &str| {
                let o = Command::new("id").arg(f).output().unwrap();
                String::from_utf8_lossy(&o.stdout).trim().to_string()
            };
            (id("-un"), id("-gn"))
        };
        let (internal, login) = if is_root() {
            ("dovecot".to_string(), "dovenull".to_string())
        } else {
            (owner.clone(), owner.clone())
        };
        let conf = format!(
            r#"base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
postmaster_address = postmaster@example.test
auth_username_format = %Ln
ssl = required
ssl_cert = <{d}/cert.pem
ssl_key = <{d}/key.pem
default_internal_user = {internal}
default_internal_group = {group_internal}
default_login_user = {login}
disable_plaintext_auth = yes
auth_mechanisms = plain login
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
}}
service auth {{
  unix_listener auth-client {{
    mode = 0666
  }}
}}
service imap-login {{
  chroot =
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid={owner} gid={group} home={d}/home/%u
}}
mail_location = maildir:~/Maildir
"#,
            d = d.display(),
            group_internal = if is_root() { "dovecot" } else { group.as_str() },
        );
        std::fs::write(d.join("dovecot.conf"), conf).unwrap();
        std::fs::write(d.join("users"), format!("{user}:{{PLAIN}}{password}\n")).unwrap();
        let maildir = d.join("home").join(user).join("Maildir");
        for sub in ["new", "cur", "tmp"] {
            std::fs::create_dir_all(maildir.join(sub)).unwrap();
        }
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", &format!("{owner}:{group}")])
                .arg(d.join("home"))
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let child = Command::new("/usr/sbin/dovecot")
            .arg("-F")
            .arg("-c")
            .arg(d.join("dovecot.conf"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        wait_for("dovecot to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", lmtp_port)).is_ok()
                && std::os::unix::net::UnixStream::connect(d.join("run").join("lmtp")).is_ok()
        });
        Dovecot {
            child,
            dir: d.clone(),
            port,
            ca: d.join("ca.pem"),
            maildir,
            lmtp_port,
            auth_socket: d.join("run").join("auth-client"),
            lmtp_socket: d.join("run").join("lmtp"),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_default()
    }

    /// Puts a message in the user's mailbox, as a delivery agent would.
    pub fn deliver(&self, name: &str, msg: &str) {
        let tmp = self.maildir.join("tmp").join(name);
        std::fs::write(&tmp, msg.replace('\n', "\r\n")).unwrap();
        if is_root() {
            let _ = Command::new("chown")
                .args(["nobody:nogroup"])
                .arg(&tmp)
                .status();
        }
        std::fs::rename(&tmp, self.maildir.join("new").join(name)).unwrap();
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
