//! `qms sieve check FILE` and `qms sieve test FILE MESSAGE`: a filter compiled, or tried on a
//! message, before it is put in place (the filtering itself is the local agent's,
//! `delivery/src/sieve/`).

use clap::Subcommand;
use qms_delivery::sieve::tool;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum SieveCmd {
    /// Compile a script; errors are printed with their line and column.
    Check { file: PathBuf },
    /// Print the actions a script would take on a message; nothing is delivered or sent.
    Test {
        file: PathBuf,
        /// The message, as a file (`-`: standard input).
        message: PathBuf,
        /// The envelope sender (default: sender@example.org).
        #[arg(long, default_value = "sender@example.org")]
        from: String,
        /// The envelope recipient whose filter this is (default: recipient@example.org).
        #[arg(long, default_value = "recipient@example.org")]
        to: String,
    },
}

/// Runs the tool with the config's `[sieve]` limits, or the defaults when there is no
/// config to read (a user trying a script needs none).
pub fn run(cfg: Option<&qms_common::Config>, cmd: SieveCmd) -> ExitCode {
    let default = qms_common::config::Sieve::default();
    let limits = cfg.map_or(&default, |c| &c.sieve);
    let hostname = cfg.map_or("localhost", |c| c.hostname.as_str());
    match cmd {
        SieveCmd::Check { file } => match tool::check(limits, &file) {
            Ok(()) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        SieveCmd::Test {
            file,
            message,
            from,
            to,
        } => {
            let text = match message.to_str() {
                Some("-") => {
                    let mut b = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut b).map(|_| b)
                }
                _ => std::fs::read(&message),
            };
            let text = match text {
                Ok(t) => crlf(&t),
                Err(e) => {
                    eprintln!("qms: {}: {e}", message.display());
                    return ExitCode::from(66);
                }
            };
            match tool::test(limits, hostname, &file, &text, &from, &to) {
                Ok(lines) => {
                    lines.iter().for_each(|l| println!("{l}"));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// A message file as the agent sees it: lines end in CRLF.
fn crlf(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len() + b.len() / 32);
    for (i, &c) in b.iter().enumerate() {
        if c == b'\n' && (i == 0 || b[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(c);
    }
    out
}
