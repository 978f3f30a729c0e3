//! `qms tls-report`: the TLS reports (RFC 8460) of one day, printed or sent; and the
//! `tlsrpt` role, which sends each finished day's reports soon after midnight (UTC).

use crate::signals;
use qms_common::log::quote;
use qms_common::{qlog, Config};
use qms_outgoing::tlsreport;
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args)]
pub struct TlsReportArgs {
    /// The UTC day (YYYY-MM-DD, `today` or `yesterday`); yesterday when absent.
    #[arg(long)]
    day: Option<String>,
    /// Send the reports to the domains' `rua` addresses (and mark the day sent) instead of
    /// printing them.
    #[arg(long)]
    send: bool,
}

/// The day an argument names.
fn day_of(arg: Option<&str>) -> Result<String, String> {
    let now = qms_common::time::now();
    match arg.unwrap_or("yesterday") {
        "today" => Ok(qms_common::time::day(now)),
        "yesterday" => Ok(qms_common::time::day(now - 86_400)),
        d if d.len() == 10 && d.bytes().all(|b| b.is_ascii_digit() || b == b'-') => {
            Ok(d.to_string())
        }
        d => Err(format!(
            "{d:?} is not a day (YYYY-MM-DD, today or yesterday)"
        )),
    }
}

pub fn run(cfg: &Config, a: TlsReportArgs) -> ExitCode {
    if let Err(e) = qms_common::privs::drop_to(cfg.user.as_deref()) {
        eprintln!("qms: {e}");
        return ExitCode::from(71);
    }
    let day = match day_of(a.day.as_deref()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("qms: {e}");
            return ExitCode::from(64);
        }
    };
    if a.send {
        let spool = match qms_spool::Spool::open(&cfg.spool, &cfg.queue_names()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("qms: {e}");
                return ExitCode::from(73);
            }
        };
        return match tlsreport::send_day(cfg, &spool, &day) {
            Ok(n) => {
                println!("{n} report(s) for {day} sent");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("qms: {e}");
                ExitCode::from(1)
            }
        };
    }
    match tlsreport::build(cfg, &day) {
        Ok(reports) => {
            for r in reports {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r.json).unwrap_or_default()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qms: {e}");
            ExitCode::from(1)
        }
    }
}

/// The `tlsrpt` role: every few minutes, sends the days before today not sent yet.
pub fn role(cfg: &Config, spool: &qms_spool::Spool) -> ExitCode {
    let mut last_day = String::new();
    while !signals::stopping() {
        let today = qms_common::time::day(qms_common::time::now());
        if today != last_day {
            let done = tlsreport::send_due(cfg, spool, &today);
            if !done.is_empty() {
                qlog!("status=tls-reports-sent days={}", quote(&done.join(",")));
            }
            last_day = today;
        }
        for _ in 0..300 {
            if signals::stopping() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    ExitCode::SUCCESS
}
