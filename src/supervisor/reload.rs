//! SIGHUP: the config read again, workers scaled and recycled, the TLS files reopened.
//! Listeners are not rebound: they were bound as root, which the supervisor is no more.

use super::slots::desired;
use super::Supervisor;
use nix::sys::signal::{kill, Signal};
use qms_common::log::quote;
use qms_common::{qlog, Config};

impl Supervisor {
    pub(super) fn reload(&mut self) {
        match Config::load(&self.cfg.path) {
            Ok(new) => {
                qlog!("event=reload config={}", self.cfg.path.display());
                // Listeners are bound once, as root, and the supervisor is root no more: a
                // listener added or removed takes effect at the next start, and says so.
                let changed = listener_changes(&self.cfg, &new);
                if !changed.is_empty() {
                    qlog!(
                        "event=reload status=warning reason={} listeners={}",
                        quote("listen addresses change only when qms is restarted (qms stop; qms start)"),
                        quote(&changed.join(","))
                    );
                }
                self.cfg = new;
                self.reopen_tls();
                qms_common::metrics::start(&self.cfg);
                // Roles read the config when they start: the ones that stay are recycled
                // (a clean stop releases their jobs), extra ones stop, missing ones start.
                let want = desired(&self.cfg, self.has_listeners);
                for (slot, c) in self.children.iter_mut() {
                    if let (Some(pid), true) = (c.pid, want.contains(slot)) {
                        c.recycle = true;
                        let _ = kill(pid, Signal::SIGTERM);
                    }
                }
                self.reconcile();
            }
            Err(e) => qlog!("event=reload status=error reason={}", quote(&e.to_string())),
        }
    }

    /// On SIGHUP: the certificate and key files opened again, so that the smtpd about to
    /// start serves a renewed certificate. qms's user must be able to read them (a key only
    /// root reads stays as opened at start, and the log says so).
    fn reopen_tls(&mut self) {
        match open_tls(&self.cfg) {
            Ok(files) => {
                if !files.is_empty() {
                    qlog!("event=reload tls=reopened pairs={}", files.len());
                }
                self.tls_files = files;
            }
            Err(e) => qlog!(
                "event=reload status=warning reason={}",
                quote(&format!(
                    "TLS files not reopened ({e}); those opened at start stay until qms is restarted"
                ))
            ),
        }
    }
}

/// Opens `[tls] cert` and `key`, then each `[tls.sni]` pair (checking that they make a
/// server config).
pub(super) fn open_tls(cfg: &Config) -> Result<Vec<(std::fs::File, std::fs::File)>, String> {
    let Some(t) = &cfg.tls else {
        return Ok(Vec::new());
    };
    qms_incoming::tls::server_config(t)?;
    let open =
        |p: &std::path::Path| std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()));
    std::iter::once((&t.cert, &t.key))
        .chain(t.sni.values().map(|(c, k)| (c, k)))
        .map(|(c, k)| Ok((open(c)?, open(k)?)))
        .collect()
}

/// The listen addresses `new` adds or drops against `old`, as `+ADDR (smtp)`/`-ADDR (smtp)`.
fn listener_changes(old: &Config, new: &Config) -> Vec<String> {
    let kinds = [
        ("smtp", &old.smtp.listen, &new.smtp.listen),
        ("submission", &old.submission.listen, &new.submission.listen),
        (
            "submissions",
            &old.submissions.listen,
            &new.submissions.listen,
        ),
    ];
    let mut out = Vec::new();
    for (kind, was, now) in kinds {
        out.extend(
            now.iter()
                .filter(|a| !was.contains(a))
                .map(|a| format!("+{a} ({kind})")),
        );
        out.extend(
            was.iter()
                .filter(|a| !now.contains(a))
                .map(|a| format!("-{a} ({kind})")),
        );
    }
    out
}
