//! `[local]`: how local submission and local delivery run, in Postfix's words.
//!
//! ```toml
//! [local]
//! postdrop = "/usr/local/sbin/qms-postdrop"   # else qms-postdrop beside the qms binary
//! default_privs = "nobody"                     # runs commands and files from the aliases file
//! allow_mail_to_commands = ["alias", "forward"]  # or "alias, forward", as in main.cf
//! allow_mail_to_files = ["alias", "forward"]
//! ```

use serde::Deserialize;
use std::path::PathBuf;

/// Where a command or file delivery was named, for `allow_mail_to_commands` and
/// `allow_mail_to_files`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The aliases file.
    Alias,
    /// A user's .forward file (qms reads none yet; kept for Postfix's defaults).
    Forward,
    /// A `:include:` file.
    Include,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Alias => "alias",
            Origin::Forward => "forward",
            Origin::Include => "include",
        }
    }

    fn parse(s: &str) -> Option<Origin> {
        match s.trim() {
            "alias" => Some(Origin::Alias),
            "forward" => Some(Origin::Forward),
            "include" => Some(Origin::Include),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Local {
    /// The drop helper; None: `qms-postdrop` beside the running `qms`.
    pub postdrop: Option<PathBuf>,
    /// The user that commands and files named in the aliases file (and in root-owned
    /// `:include:` files) run as. Never root.
    pub default_privs: String,
    pub allow_mail_to_commands: Vec<Origin>,
    pub allow_mail_to_files: Vec<Origin>,
}

impl Default for Local {
    fn default() -> Local {
        Local {
            postdrop: None,
            default_privs: "nobody".into(),
            allow_mail_to_commands: vec![Origin::Alias, Origin::Forward],
            allow_mail_to_files: vec![Origin::Alias, Origin::Forward],
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Origins {
    Text(String),
    List(Vec<String>),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLocal {
    pub(super) postdrop: Option<String>,
    pub(super) default_privs: Option<String>,
    pub(super) allow_mail_to_commands: Option<Origins>,
    pub(super) allow_mail_to_files: Option<Origins>,
}

fn origins(
    key: &str,
    v: Option<Origins>,
    default: Vec<Origin>,
) -> Result<Vec<Origin>, (String, String)> {
    let words: Vec<String> = match v {
        None => return Ok(default),
        Some(Origins::Text(t)) => t
            .split([',', ' '])
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect(),
        Some(Origins::List(l)) => l,
    };
    words
        .iter()
        .map(|w| {
            Origin::parse(w).ok_or_else(|| {
                (
                    format!("local.{key}"),
                    format!("{w:?} is not alias, forward or include"),
                )
            })
        })
        .collect()
}

impl RawLocal {
    /// The typed section; errors name the key.
    pub(super) fn build(
        self,
        resolve: &dyn Fn(&str) -> PathBuf,
    ) -> Result<Local, (String, String)> {
        let d = Local::default();
        let default_privs = self.default_privs.unwrap_or(d.default_privs);
        if default_privs == "root" || default_privs.is_empty() {
            return Err((
                "local.default_privs".into(),
                "must name an unprivileged user, never root".into(),
            ));
        }
        Ok(Local {
            postdrop: self.postdrop.as_deref().map(resolve),
            default_privs,
            allow_mail_to_commands: origins(
                "allow_mail_to_commands",
                self.allow_mail_to_commands,
                d.allow_mail_to_commands,
            )?,
            allow_mail_to_files: origins(
                "allow_mail_to_files",
                self.allow_mail_to_files,
                d.allow_mail_to_files,
            )?,
        })
    }
}
