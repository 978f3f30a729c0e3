//! `qms sieve check` and `qms sieve test`: a script compiled, or run on a message, with
//! nothing stored or sent (Pigeonhole's `sievec` and `sieve-test`).

use super::run::{self, Action, Envelope, Host, Msg, Scripts};
use qms_common::config;
use sieve::Sieve;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Compiles the script at `path`; the error names its line.
pub fn check(cfg: &config::Sieve, path: &Path) -> Result<(), String> {
    read_compile(cfg, path).map(|_| ())
}

fn read_compile(cfg: &config::Sieve, path: &Path) -> Result<Sieve, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    super::compile(&super::compiler(cfg), &text).map_err(|e| format!("{}: {e}", path.display()))
}

/// What the script at `path` would do with `message` sent by `from` to `to`, one action
/// per line; nothing is delivered and no reply is remembered.
pub fn test(
    cfg: &config::Sieve,
    hostname: &str,
    path: &Path,
    message: &[u8],
    from: &str,
    to: &str,
) -> Result<Vec<String>, String> {
    let script = Arc::new(read_compile(cfg, path)?);
    let scripts = Scripts {
        before: None,
        main: Some(script),
        after: None,
    };
    let mut host = Dry {
        cfg,
        dir: path.parent().map(Path::to_path_buf),
    };
    let env = Envelope {
        from,
        to,
        orcpt: to,
    };
    let rt = super::runtime(cfg, hostname);
    let v = run::evaluate(
        &rt,
        cfg.max_vacation_replies,
        &scripts,
        message,
        &env,
        &mut host,
    );
    let mut lines = Vec::new();
    if let Some(e) = &v.error {
        lines.push(format!("error: {e}; the message would be kept"));
    }
    lines.extend(v.notes.iter().map(|n| format!("note: {n}")));
    for a in &v.actions {
        lines.push(describe(a));
    }
    Ok(lines)
}

fn describe(a: &Action) -> String {
    let edited = |m: &Msg| match m {
        Msg::Original => "",
        Msg::Edited(_) => " (edited)",
    };
    let flags = |f: &[String]| match f.is_empty() {
        true => String::new(),
        false => format!(" flags {}", f.join(" ")),
    };
    match a {
        Action::Keep { flags: f, message } => format!("keep{}{}", flags(f), edited(message)),
        Action::FileInto {
            folder,
            flags: f,
            message,
        } => format!("fileinto {folder:?}{}{}", flags(f), edited(message)),
        Action::Redirect { to, message } => format!("redirect {to:?}{}", edited(message)),
        Action::Vacation { to, message } => {
            let subject = String::from_utf8_lossy(message)
                .lines()
                .take_while(|l| !l.is_empty())
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                .unwrap_or_default();
            format!("vacation reply to {to:?}, subject {subject:?}")
        }
        Action::Discard => "discard".into(),
        Action::Reject { reason } => format!("reject {reason:?}"),
    }
}

/// A host that stores nothing: includes are read beside the script or from
/// `[sieve] global_dir`, no folder exists yet and nobody was answered before.
struct Dry<'a> {
    cfg: &'a config::Sieve,
    dir: Option<PathBuf>,
}

impl Host for Dry<'_> {
    fn include(&mut self, global: bool, name: &str) -> Result<Option<Arc<Sieve>>, String> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(format!("script name {name:?} refused"));
        }
        let dir = match global {
            true => Some(self.cfg.global_dir.clone()),
            false => self.dir.clone(),
        };
        let Some(dir) = dir else { return Ok(None) };
        let path = dir.join(format!("{}.sieve", name.trim_end_matches(".sieve")));
        match path.exists() {
            true => read_compile(self.cfg, &path).map(|s| Some(Arc::new(s))),
            false => Ok(None),
        }
    }

    fn folder_exists(&self, _: &str) -> bool {
        false
    }

    fn seen(&mut self, _: &str) -> bool {
        false
    }
}
