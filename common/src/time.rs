//! Wall-clock time as qms writes it: Unix seconds in job files, RFC 5322 dates in headers,
//! ISO 8601 in logs and listings. UTC throughout, so no time zone database is needed.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's civil_from_days.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

struct Parts {
    y: i64,
    mo: u32,
    d: u32,
    h: i64,
    mi: i64,
    s: i64,
    wday: usize,
}

fn parts(t: i64) -> Parts {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (y, mo, d) = civil(days);
    Parts {
        y,
        mo,
        d,
        h: secs / 3600,
        mi: secs % 3600 / 60,
        s: secs % 60,
        wday: (days + 4).rem_euclid(7) as usize,
    }
}

const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `Sun, 22 Nov 2026 18:47:31 +0000`
pub fn rfc5322(t: i64) -> String {
    let p = parts(t);
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[p.wday],
        p.d,
        MONTHS[(p.mo - 1) as usize],
        p.y,
        p.h,
        p.mi,
        p.s
    )
}

/// `Sun Nov 22 18:47:31 2026`: C's asctime, as mbox `From ` lines carry it (UTC).
pub fn asctime(t: i64) -> String {
    let p = parts(t);
    format!(
        "{} {} {:2} {:02}:{:02}:{:02} {}",
        DAYS[p.wday],
        MONTHS[(p.mo - 1) as usize],
        p.d,
        p.h,
        p.mi,
        p.s,
        p.y
    )
}

/// `2026-11-22`: the UTC day of `t`.
pub fn day(t: i64) -> String {
    let p = parts(t);
    format!("{}-{:02}-{:02}", p.y, p.mo, p.d)
}

/// `2026-11-22T18:47:31Z`
pub fn iso8601(t: i64) -> String {
    Iso8601(t).to_string()
}

/// A Unix time written as [`iso8601`] does, straight into what is being formatted.
pub struct Iso8601(pub i64);

impl std::fmt::Display for Iso8601 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = parts(self.0);
        write!(
            f,
            "{}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            p.y, p.mo, p.d, p.h, p.mi, p.s
        )
    }
}

/// A duration in the short form mailq shows: `45s`, `12m`, `3h`, `2d`.
pub fn short_duration(secs: i64) -> String {
    match secs.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// A duration in seconds from `300`, `90s`, `5m`, `4h`, `5d` or `2w`.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, ""),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (300, 90s, 5m, 4h, 5d, 2w)"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h, d or w")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc5322(1_795_373_251), "Sun, 22 Nov 2026 18:47:31 +0000");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
    }
}
