//! Fuzzes a whole SMTP session: the command parser, DATA and BDAT readers, parameter and
//! address parsing, policy, and spooling of whatever gets accepted.
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run smtp_session -- -max_total_time=600
#![no_main]

use libfuzzer_sys::fuzz_target;
use qms_incoming::{Conn, Kind, Peer, Session, Shared};
use std::io::{Cursor, Read, Write};
use std::sync::{Arc, OnceLock};

struct Pipe {
    input: Cursor<Vec<u8>>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("qms-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fuzz dir");
        let text = "spool = \"spool\"\nhostname = \"mx.example.test\"\n[domains]\nlocal = [\"example.test\"]\nrelay = [\"relay.test\"]\n[mailboxes]\n\"alice@example.test\" = { maildir = \"mail/alice\" }\n[limits]\nmessage_size = 4096\nrecipients = 5\nerrors = 50\n";
        let cfg = qms_common::Config::parse(&dir.join("qms.toml"), text).expect("config");
        let spool = qms_spool::Spool::open(&cfg.spool, &cfg.queue_names()).expect("spool");
        Shared {
            committer: qms_spool::Committer::start(spool.clone()),
            aliases: qms_common::aliases::Cache::new(None),
            cfg: Arc::new(cfg),
            spool,
            tls: None,
            throttle: Default::default(),
            checks: None,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let shared = shared();
    let peer = Peer { addr: Some("192.0.2.1".parse().expect("ip")), local_user: None, forced_sender: None };
    let mut input = b"EHLO fuzz.test\r\n".to_vec();
    input.extend_from_slice(data);
    Session::new(shared, Kind::Smtp, peer, Conn::new(Box::new(Pipe { input: Cursor::new(input) }))).run();
    // Keep the spool small: remove what the session queued.
    let q = shared.spool.queue_dir("incoming");
    if let Ok(rd) = std::fs::read_dir(&q) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if let Ok(rd) = std::fs::read_dir(shared.spool.root().join("msg")) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
});
