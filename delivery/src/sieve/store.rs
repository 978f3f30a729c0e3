//! What a filter stores, done by the filter process as the mailbox's user: copies into the
//! folders of a Maildir++ mailbox, and the memory of vacation replies beside them.
//!
//! Folder names are the IMAP names Dovecot shows for Maildir++: `INBOX` is the Maildir
//! itself and `Lists/sales` (or `Lists.sales`) is its directory `.Lists.sales`. A name that
//! would leave the mailbox (`..`, an empty part, a control character) is filed in the inbox.

use crate::maildir;
use qms_common::safeio;
use std::io;
use std::path::{Path, PathBuf};

/// The directory of `folder` in the mailbox at `root`, or why the name is refused.
pub fn folder_dir(root: &Path, folder: &str) -> Result<PathBuf, String> {
    let inbox = |p: &str| p.eq_ignore_ascii_case("INBOX");
    let mut parts: Vec<&str> = folder.split(['/', '.']).collect();
    if parts.first().is_some_and(|p| inbox(p)) {
        parts.remove(0);
    }
    if parts.is_empty() || parts == [""] {
        return Ok(root.to_path_buf());
    }
    let bad = |p: &&str| p.is_empty() || p.chars().any(|c| c.is_control()) || p.len() > 200;
    if parts.iter().any(bad) || folder.len() > 512 {
        return Err(format!("folder name {folder:?} refused"));
    }
    Ok(root.join(format!(".{}", parts.join("."))))
}

/// The Maildir info part for IMAP system flags (`2,FS`); "" when there are none. Keywords
/// are not kept: Maildir stores them in a file of the reader's own.
pub fn info(flags: &[String]) -> String {
    let mut letters: Vec<char> = flags
        .iter()
        .filter_map(|f| match f.to_ascii_lowercase().as_str() {
            "\\draft" => Some('D'),
            "\\flagged" => Some('F'),
            "\\answered" => Some('R'),
            "\\seen" => Some('S'),
            "\\deleted" => Some('T'),
            _ => None,
        })
        .collect();
    letters.sort_unstable();
    letters.dedup();
    match letters.is_empty() {
        true => String::new(),
        false => format!("2,{}", letters.iter().collect::<String>()),
    }
}

/// One copy to store.
pub struct Copy<'a> {
    pub dir: PathBuf,
    pub info: String,
    pub message: &'a [u8],
}

/// Stages `copies` under `name_of(copy)`, skipping those an interrupted attempt made
/// (`recheck`); the caller makes them durable (`safeio::commit`, one sync for many). The
/// inbox is made when `create_inbox`; a folder whenever it is missing (it is marked
/// `maildirfolder`, as Maildir++ readers expect).
pub fn stage(
    copies: &[Copy],
    inbox: &Path,
    create_inbox: bool,
    recheck: bool,
    name_of: &dyn Fn(&Copy) -> maildir::Name,
) -> io::Result<Vec<safeio::Staged>> {
    let mut staged = Vec::new();
    for c in copies {
        let is_inbox = c.dir == inbox;
        let made = maildir::ensure(&c.dir, !is_inbox || create_inbox)
            .and_then(|()| match is_inbox {
                true => Ok(()),
                false => mark_folder(&c.dir),
            })
            .map(|()| name_of(c))
            .and_then(|name| match recheck && maildir::holds(&c.dir, &name)? {
                true => Ok(None),
                false => maildir::stage(&c.dir, &name, c.message, &c.info).map(Some),
            });
        match made {
            Ok(Some(s)) => staged.push(s),
            Ok(None) => {}
            Err(e) => {
                staged.into_iter().for_each(safeio::Staged::abandon);
                return Err(e);
            }
        }
    }
    Ok(staged)
}

fn mark_folder(dir: &Path) -> io::Result<()> {
    let mark = dir.join("maildirfolder");
    if !mark.exists() {
        std::fs::write(&mark, b"")?;
    }
    Ok(())
}

/// Who was answered, for `vacation` and `duplicate`: `EXPIRY HASH` lines in
/// `qms-sieve.seen` at the top of the mailbox, owned by the user.
pub struct Memory {
    path: PathBuf,
    entries: Vec<(i64, String)>,
}

/// The memory keeps at most this many answers; the ones that expire first go.
const REMEMBERED: usize = 10_000;

impl Memory {
    pub fn load(inbox: &Path) -> Memory {
        let path = inbox.join("qms-sieve.seen");
        let now = qms_common::time::now();
        let entries = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (t, h) = l.split_once(' ')?;
                let t: i64 = t.parse().ok()?;
                (t > now).then(|| (t, h.to_string()))
            })
            .collect();
        Memory { path, entries }
    }

    fn hash(id: &str) -> String {
        use sha2::Digest;
        let d = sha2::Sha256::digest(id.as_bytes());
        d[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn seen(&self, id: &str) -> bool {
        let h = Memory::hash(id);
        self.entries.iter().any(|(_, e)| *e == h)
    }

    /// Adds `ids` (with their lifetimes in seconds) and writes the file in place atomically.
    pub fn remember(&mut self, ids: &[(String, u64)]) -> io::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let now = qms_common::time::now();
        for (id, secs) in ids {
            let until = now.saturating_add(i64::try_from(*secs).unwrap_or(i64::MAX));
            self.entries.push((until, Memory::hash(id)));
        }
        if self.entries.len() > REMEMBERED {
            self.entries
                .sort_unstable_by_key(|(t, _)| std::cmp::Reverse(*t));
            self.entries.truncate(REMEMBERED);
        }
        let text: String = self
            .entries
            .iter()
            .map(|(t, h)| format!("{t} {h}\n"))
            .collect();
        let tmp = self.path.with_extension("seen.tmp");
        safeio::write_atomic(tmp, self.path.clone(), text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_stay_inside_the_mailbox() {
        let root = Path::new("/m");
        assert_eq!(folder_dir(root, "INBOX").unwrap(), root);
        assert_eq!(folder_dir(root, "inbox").unwrap(), root);
        assert_eq!(
            folder_dir(root, "Lists/sales").unwrap(),
            Path::new("/m/.Lists.sales")
        );
        assert_eq!(
            folder_dir(root, "INBOX.Spam").unwrap(),
            Path::new("/m/.Spam")
        );
        for bad in ["../x", "a//b", ".hidden", "a/\nb", "x/"] {
            assert!(folder_dir(root, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn system_flags_become_maildir_info() {
        let f = |v: &[&str]| info(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(f(&["\\Seen", "\\Flagged", "$label"]), "2,FS");
        assert_eq!(f(&["$label"]), "");
    }
}
