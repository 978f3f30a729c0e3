//! `qms suppress list|add|remove`: the recipients tracked sending no longer sends to (kept
//! in the tracking database; see `qms_tracker::suppress`).

use clap::Subcommand;
use qms_common::Config;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum SuppressCmd {
    /// Show the suppressed recipients, why and since when.
    List {
        /// One JSON object per entry, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Suppress a recipient by hand (an existing entry is replaced).
    Add {
        address: String,
        /// Why, in words the next reader understands.
        #[arg(long, default_value = "added by hand")]
        reason: String,
    },
    /// Allow a recipient again.
    Remove { address: String },
}

pub fn run(cfg: &Config, cmd: SuppressCmd) -> ExitCode {
    // As the spool's owner, so that a database this creates belongs to qms, not root.
    if let Err(e) = qms_common::privs::drop_to(cfg.user.as_deref()) {
        eprintln!("qms: {e}");
        return ExitCode::from(71);
    }
    let db = match qms_tracker::Db::connect(cfg) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("qms: {e}");
            return ExitCode::from(73);
        }
    };
    let result = match cmd {
        SuppressCmd::List { json } => db.suppression_list().map(|list| {
            for s in list {
                if json {
                    println!("{}", serde_json::to_string(&s).unwrap_or_default());
                } else {
                    println!(
                        "{}  {}  {}  reason=\"{}\"{}",
                        s.address,
                        qms_common::time::iso8601(s.time),
                        s.source,
                        s.reason,
                        s.qid.map(|q| format!(" qid={q}")).unwrap_or_default()
                    );
                }
            }
        }),
        SuppressCmd::Add { address, reason } => match qms_common::Address::parse(&address) {
            Ok(a) => db.suppress(&a.to_string(), &reason),
            Err(e) => Err(format!("{address}: {e}")),
        },
        SuppressCmd::Remove { address } => db.unsuppress(&address).and_then(|found| {
            if found {
                Ok(())
            } else {
                Err(format!("{address} is not suppressed"))
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qms: {e}");
            ExitCode::from(1)
        }
    }
}
