//! A private PostgreSQL cluster on a loopback port: `initdb` and `pg_ctl` from Debian's
//! packages into the test's directory, run as an ordinary user (`nobody` when the tests
//! run as root, since PostgreSQL refuses root).

use super::*;

pub struct Postgres {
    data: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    pub port: u16,
    /// `postgresql://qms@127.0.0.1:PORT/postgres`
    pub url: String,
    /// With TLS: the CA that signed the server's certificate.
    pub ca: Option<PathBuf>,
    /// Server options besides the port and socket.
    options: String,
}

/// The newest installed server's programs.
fn server_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server (apt-get install postgresql)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb under /usr/lib/postgresql")
}

/// Runs a PostgreSQL program as the cluster's owner.
fn as_owner(bin: &Path, prog: &str, args: &[&str]) -> Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(bin.join(prog));
        c
    } else {
        Command::new(bin.join(prog))
    };
    cmd.args(args)
        .current_dir("/")
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"))
}

impl Postgres {
    pub fn start(dir: &Path) -> Postgres {
        Postgres::start_with(dir, false)
    }

    /// A cluster that offers TLS with a certificate for 127.0.0.1 from a test CA.
    pub fn start_tls(dir: &Path) -> Postgres {
        Postgres::start_with(dir, true)
    }

    fn start_with(dir: &Path, tls: bool) -> Postgres {
        let bin = server_bin();
        let top = dir.join("pg");
        std::fs::create_dir_all(&top).unwrap();
        if is_root() {
            Command::new("chown")
                .args(["-R", "nobody:nogroup"])
                .arg(&top)
                .status()
                .unwrap();
        }
        let data = top.join("data");
        let (ca, options) = if tls {
            let t = top.join("tls");
            std::fs::create_dir_all(&t).unwrap();
            make_ca_cert(&t, "127.0.0.1");
            let key = t.join("key.pem");
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            if is_root() {
                Command::new("chown")
                    .args(["-R", "nobody:nogroup"])
                    .arg(&t)
                    .status()
                    .unwrap();
            }
            let opts = format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                t.join("cert.pem").display(),
                key.display()
            );
            (Some(t.join("ca.pem")), opts)
        } else {
            (None, String::new())
        };
        let out = as_owner(
            &bin,
            "initdb",
            &[
                "-D",
                &data.display().to_string(),
                "-U",
                "qms",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        assert!(out.status.success(), "initdb: {out:?}");
        let port = free_port();
        let pg = Postgres {
            log: top.join("log"),
            data,
            bin,
            port,
            url: format!("postgresql://qms@127.0.0.1:{port}/postgres"),
            ca,
            options,
        };
        pg.run();
        pg
    }

    /// Starts the server (again) and waits until it takes connections.
    pub fn run(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off{}",
            self.port,
            self.data.display(),
            self.options
        );
        let out = as_owner(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-l",
                &self.log.display().to_string(),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
        assert!(out.status.success(), "pg_ctl start: {out:?}");
        wait_for("PostgreSQL", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    pub fn stop(&self) {
        let out = as_owner(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
        assert!(out.status.success(), "pg_ctl stop: {out:?}");
    }

    /// Runs SQL with psql; its output, tuples only.
    pub fn sql(&self, query: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "qms",
                "-d",
                "postgres",
                "-At",
                "-c",
                query,
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {query}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_owner(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-m",
                "immediate",
                "stop",
            ],
        );
    }
}
