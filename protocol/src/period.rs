//! Periods as people write them: `90d`, `12h`, `1h30m`. Keys' rotation
//! periods travel as seconds; this is how hsmd and hsmctl show them, so a
//! period given as `90d` reads back as `90d`, not as months and hours.

/// `secs` in days, hours, minutes and seconds, largest first, leaving out
/// units that are zero: `7776000` → `"90d"`, `5400` → `"1h30m"`, `0` → `"0s"`.
/// humantime and hsmctl read the result back as the same number of seconds.
#[must_use]
pub fn format_period(secs: u64) -> String {
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    let mut rest = secs;
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        let n = rest / size;
        rest %= size;
        if n > 0 {
            out.push_str(&n.to_string());
            out.push_str(unit);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::format_period;

    #[test]
    fn periods_read_as_they_were_written() {
        assert_eq!(format_period(90 * 86_400), "90d");
        assert_eq!(format_period(3_600), "1h");
        assert_eq!(format_period(5_400), "1h30m");
        assert_eq!(format_period(86_400 + 1), "1d1s");
        assert_eq!(format_period(0), "0s");
    }
}
