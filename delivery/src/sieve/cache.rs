//! Compiled scripts, kept by the local agent by file identity and modification time.
//!
//! Scripts are read by the filter process, as the user, never by the agent. The filter
//! process is a fork of the agent, so it sees the agent's cache as it was; what it had to
//! compile itself it sends back (`Learned`), and the agent compiles that text into its cache
//! for the next delivery. An entry is only used when the file the user's process opened
//! still has the same device, inode, size and modification time.

use serde::{Deserialize, Serialize};
use sieve::{Compiler, Sieve};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A script file as it was when read.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Key {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl Key {
    pub fn of(path: &Path, m: &std::fs::Metadata) -> Key {
        Key {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }
    }
}

/// A script the filter process compiled that the cache did not hold.
#[derive(Debug, Serialize, Deserialize)]
pub struct Learned {
    pub key: Key,
    pub text: String,
}

/// At most this many scripts are kept; past it the cache starts again.
const ENTRIES: usize = 4096;

#[derive(Default)]
pub struct Cache {
    scripts: HashMap<Key, Arc<Sieve>>,
}

impl Cache {
    pub fn get(&self, key: &Key) -> Option<Arc<Sieve>> {
        self.scripts.get(key).cloned()
    }

    /// Compiles what a filter process learnt; text that does not compile is not kept (the
    /// next run reports the error again).
    pub fn learn(&mut self, compiler: &Compiler, learned: Vec<Learned>) {
        for l in learned {
            if l.text.len() as u64 != l.key.size {
                continue;
            }
            if let Ok(s) = compiler.compile(l.text.as_bytes()) {
                if self.scripts.len() >= ENTRIES {
                    self.scripts.clear();
                }
                self.scripts.insert(l.key, Arc::new(s));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_is_used_only_while_its_file_is_unchanged() {
        let dir = std::env::temp_dir().join(format!("qms-sieve-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.sieve");
        std::fs::write(&path, "keep;\n").unwrap();
        let key = Key::of(&path, &std::fs::metadata(&path).unwrap());
        let mut cache = Cache::default();
        let compiler = Compiler::new();
        // Text that is not what the file held when read is not kept.
        cache.learn(
            &compiler,
            vec![Learned {
                key: key.clone(),
                text: "discard;\n".into(),
            }],
        );
        assert!(cache.get(&key).is_none());
        cache.learn(
            &compiler,
            vec![Learned {
                key: key.clone(),
                text: "keep;\n".into(),
            }],
        );
        assert!(cache.get(&key).is_some());
        std::fs::write(&path, "discard;\n").unwrap();
        let changed = Key::of(&path, &std::fs::metadata(&path).unwrap());
        assert!(
            cache.get(&changed).is_none(),
            "a changed file used its old script"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
