//! aliases(5) files: `name: target, target, …` with continuation lines and `#` comments.
//!
//! This module reads the file; expanding targets (nesting, `:include:`, loops) is the router's.

use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Another name or a full address.
    Address(String),
    /// `/path/to/file`: append the message.
    File(String),
    /// `|command`: pipe the message to a program.
    Command(String),
    /// `:include:/path`: more targets, one or more per line.
    Include(String),
}

#[derive(Clone, Debug, Default)]
pub struct Aliases {
    map: HashMap<String, Vec<Target>>,
    /// What is not wrong enough to refuse the file but a reader should hear: a name defined
    /// twice (the first is used, as postalias does).
    pub warnings: Vec<String>,
}

#[derive(Debug)]
pub struct AliasError {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for AliasError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl Aliases {
    pub fn load(path: &Path) -> Result<Aliases, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Aliases::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Aliases, AliasError> {
        let mut map = HashMap::new();
        let mut first_line: HashMap<String, usize> = HashMap::new();
        let mut warnings = Vec::new();
        // Join continuation lines (starting with white space) onto their entry first.
        let mut entries: Vec<(usize, String)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim_start().starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                match entries.last_mut() {
                    Some((_, e)) => {
                        e.push(' ');
                        e.push_str(line.trim());
                    }
                    None => {
                        return Err(AliasError {
                            line: i + 1,
                            message: "continuation line before any alias".into(),
                        })
                    }
                }
            } else {
                entries.push((i + 1, line.trim().to_string()));
            }
        }
        for (line, entry) in entries {
            let (name, rest) = entry.split_once(':').ok_or_else(|| AliasError {
                line,
                message: format!("{entry:?} has no ':' after the name"),
            })?;
            let name = name.trim().trim_matches('"').to_lowercase();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(AliasError {
                    line,
                    message: format!("bad alias name {name:?}"),
                });
            }
            let targets = parse_targets(rest).map_err(|message| AliasError { line, message })?;
            if targets.is_empty() {
                return Err(AliasError {
                    line,
                    message: format!("alias {name:?} has no targets"),
                });
            }
            if let Some(first) = first_line.get(&name) {
                warnings.push(format!(
                    "line {line}: alias {name:?} is defined again (first at line {first}); the first is used"
                ));
                continue;
            }
            first_line.insert(name.clone(), line);
            map.insert(name, targets);
        }
        Ok(Aliases { map, warnings })
    }

    /// The targets of a name (the local part, lower-cased, or a full address).
    pub fn get(&self, name: &str) -> Option<&[Target]> {
        self.map.get(&name.to_lowercase()).map(Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Splits a target list at commas outside double quotes.
pub fn parse_targets(text: &str) -> Result<Vec<Target>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let push = |raw: &str, out: &mut Vec<Target>| -> Result<(), String> {
        let t = raw.trim().trim_matches('"').trim();
        if t.is_empty() {
            return Ok(());
        }
        let target = if let Some(cmd) = t.strip_prefix('|') {
            Target::Command(cmd.trim().to_string())
        } else if let Some(p) = t.strip_prefix(":include:") {
            Target::Include(p.trim().to_string())
        } else if t.starts_with('/') {
            Target::File(t.to_string())
        } else if t.contains(char::is_whitespace) {
            return Err(format!(
                "target {t:?} has spaces: quote commands as \"|command args\""
            ));
        } else {
            Target::Address(t.to_string())
        };
        out.push(target);
        Ok(())
    };
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => push(&std::mem::take(&mut cur), &mut out)?,
            c => cur.push(c),
        }
    }
    if quoted {
        return Err("unclosed quote".into());
    }
    push(&cur, &mut out)?;
    Ok(out)
}

/// The aliases of a running process, re-read when the file changes (checked at most once a
/// second), so `newaliases` or an edit takes effect without a restart.
pub struct Cache {
    path: Option<std::path::PathBuf>,
    state: std::sync::Mutex<CacheState>,
}

struct CacheState {
    aliases: std::sync::Arc<Aliases>,
    mtime: Option<std::time::SystemTime>,
    checked: Option<std::time::Instant>,
}

impl Cache {
    pub fn new(path: Option<std::path::PathBuf>) -> Cache {
        let c = Cache {
            path,
            state: std::sync::Mutex::new(CacheState {
                aliases: Default::default(),
                mtime: None,
                checked: None,
            }),
        };
        let _ = c.get();
        c
    }

    pub fn get(&self) -> std::sync::Arc<Aliases> {
        let Ok(mut st) = self.state.lock() else {
            return Default::default();
        };
        let fresh = st
            .checked
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1));
        if fresh {
            return st.aliases.clone();
        }
        st.checked = Some(std::time::Instant::now());
        let Some(path) = &self.path else {
            return st.aliases.clone();
        };
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if mtime != st.mtime {
            st.mtime = mtime;
            match Aliases::load(path) {
                Ok(a) => st.aliases = std::sync::Arc::new(a),
                Err(e) => crate::qlog!(
                    "status=warning aliases={} reason={}",
                    path.display(),
                    crate::log::quote(&e)
                ),
            }
        }
        st.aliases.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_aliases_file() {
        let a = Aliases::parse(
            "# comment\npostmaster: root\nstaff: alice, bob@remote.test,\n  /var/log/staff.mbox, \"|/usr/bin/logger -t mail\"\nlist: :include:/etc/qms/list\n",
        )
        .unwrap();
        assert_eq!(
            a.get("POSTMASTER").unwrap(),
            &[Target::Address("root".into())]
        );
        let staff = a.get("staff").unwrap();
        assert_eq!(staff.len(), 4);
        assert_eq!(staff[3], Target::Command("/usr/bin/logger -t mail".into()));
        assert_eq!(
            a.get("list").unwrap(),
            &[Target::Include("/etc/qms/list".into())]
        );
        assert!(Aliases::parse("nocolon\n").is_err());
    }
}
