//! Bandwidth limits with a daily schedule (`--bandwidth 08:00-18:00=50M,*=0`) and the fixed
//! time zone they are read in (`time-zone = "+01:00"`): the grammar, its one validation and
//! which limit is in force at a given time. Pure functions; the token bucket that applies a
//! limit is the transport's (`vmr_transport::TokenBucket`).

use serde::{Deserialize, Serialize};

/// Minutes in a day.
const DAY_MIN: u16 = 1440;

/// Why a bandwidth schedule or a time zone was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BandwidthError {
    /// The text is empty.
    #[error("empty bandwidth schedule: expected e.g. 08:00-18:00=50M,*=0 or 10M")]
    Empty,
    /// An item is not `HH:MM-HH:MM=RATE`, `*=RATE` or `RATE`.
    #[error("bad bandwidth item {0:?}: expected HH:MM-HH:MM=RATE, *=RATE or RATE")]
    BadItem(String),
    /// A time is not `HH:MM` (00:00 to 24:00).
    #[error("bad time {0:?}: expected HH:MM from 00:00 to 24:00")]
    BadTime(String),
    /// A rate is not a number of bytes per second with an optional K, M, G, Ki, Mi, Gi suffix.
    #[error("bad rate {0:?}: expected bytes per second, e.g. 500K, 50M, 1G, 8Mi or 0 (unlimited)")]
    BadRate(String),
    /// A range starts where it ends.
    #[error("empty time range {0:?}: the start equals the end (use *=RATE for the whole day)")]
    EmptyRange(String),
    /// Two ranges share some minutes.
    #[error("time ranges {0:?} and {1:?} overlap")]
    Overlap(String, String),
    /// `*` given more than once.
    #[error("`*` (the rest of the day) given more than once")]
    DuplicateRest,
    /// The time zone is not `UTC` or `+HH:MM` / `-HH:MM`.
    #[error("bad time zone {0:?}: expected UTC or a fixed offset like +01:00 or -05:30")]
    BadZone(String),
}

/// One daily range of a schedule: `start` inclusive, `end` exclusive, in minutes after
/// midnight in the agent's zone; `start > end` wraps over midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BandwidthRange {
    /// Minutes after midnight at which the range starts (0-1439).
    pub start_min: u16,
    /// Minutes after midnight at which it ends (1-1440; 1440 = midnight).
    pub end_min: u16,
    /// Bytes per second; 0 = unlimited.
    pub limit: u64,
}

impl BandwidthRange {
    fn contains(&self, m: u16) -> bool {
        if self.start_min < self.end_min {
            self.start_min <= m && m < self.end_min
        } else {
            m >= self.start_min || m < self.end_min
        }
    }

    /// The range as one or two non-wrapping `[a, b)` pieces.
    fn pieces(&self) -> Vec<(u16, u16)> {
        if self.start_min < self.end_min {
            vec![(self.start_min, self.end_min)]
        } else {
            vec![(self.start_min, DAY_MIN), (0, self.end_min)]
        }
    }

    fn text(&self) -> String {
        format!("{}-{}", hhmm(self.start_min), hhmm(self.end_min))
    }
}

/// A daily bandwidth schedule: ranges with their limit, and the limit for the rest of the day
/// (`*`; unlimited when not given). Serialized as its text (`08:00-18:00=50M,*=0`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BandwidthSchedule {
    /// The ranges, in the order given; they never overlap.
    pub ranges: Vec<BandwidthRange>,
    /// Bytes per second outside every range; 0 = unlimited.
    pub rest: u64,
}

impl BandwidthSchedule {
    /// Parse `ITEM[,ITEM...]` where ITEM is `HH:MM-HH:MM=RATE`, `*=RATE` or a bare `RATE`
    /// (the same as `*=RATE`). RATE is bytes per second: a whole number with an optional
    /// decimal suffix K, M, G (10^3, 10^6, 10^9) or binary Ki, Mi, Gi; 0 = unlimited.
    /// Overlapping ranges are refused; a range may wrap over midnight (22:00-06:00).
    pub fn parse(s: &str) -> Result<BandwidthSchedule, BandwidthError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(BandwidthError::Empty);
        }
        let mut ranges: Vec<BandwidthRange> = Vec::new();
        let mut rest = None;
        for item in s.split(',').map(str::trim) {
            let (when, rate) = match item.split_once('=') {
                Some((w, r)) => (Some(w.trim()), r.trim()),
                None => (None, item),
            };
            let limit = parse_rate(rate)?;
            match when {
                None | Some("*") => {
                    if rest.replace(limit).is_some() {
                        return Err(BandwidthError::DuplicateRest);
                    }
                }
                Some(w) => {
                    let (a, b) = w
                        .split_once('-')
                        .ok_or_else(|| BandwidthError::BadItem(item.to_owned()))?;
                    let start_min = parse_time(a.trim())?;
                    let end_min = parse_time(b.trim())?;
                    if start_min % DAY_MIN == end_min % DAY_MIN {
                        return Err(BandwidthError::EmptyRange(w.to_owned()));
                    }
                    if start_min == DAY_MIN {
                        return Err(BandwidthError::BadTime(a.trim().to_owned()));
                    }
                    let r = BandwidthRange {
                        start_min,
                        end_min: if end_min == 0 { DAY_MIN } else { end_min },
                        limit,
                    };
                    if let Some(o) = ranges.iter().find(|o| overlaps(o, &r)) {
                        return Err(BandwidthError::Overlap(o.text(), r.text()));
                    }
                    ranges.push(r);
                }
            }
        }
        Ok(BandwidthSchedule {
            ranges,
            rest: rest.unwrap_or(0),
        })
    }

    /// The limit (bytes/s, 0 = unlimited) in force at minute `minute` of the day (0-1439).
    pub fn limit_at_minute(&self, minute: u16) -> u64 {
        let m = minute % DAY_MIN;
        self.ranges
            .iter()
            .find(|r| r.contains(m))
            .map_or(self.rest, |r| r.limit)
    }

    /// The limit (bytes/s, 0 = unlimited) in force at `unix_ms` (ms since the epoch) in `zone`.
    pub fn limit_at(&self, unix_ms: u64, zone: TimeZone) -> u64 {
        self.limit_at_minute(zone.minute_of_day(unix_ms))
    }

    /// Whether the schedule never limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.rest == 0 && self.ranges.iter().all(|r| r.limit == 0)
    }
}

impl std::fmt::Display for BandwidthSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for r in &self.ranges {
            write!(f, "{}={},", r.text(), rate_text(r.limit))?;
        }
        write!(f, "*={}", rate_text(self.rest))
    }
}

impl TryFrom<String> for BandwidthSchedule {
    type Error = BandwidthError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        BandwidthSchedule::parse(&s)
    }
}

impl From<BandwidthSchedule> for String {
    fn from(s: BandwidthSchedule) -> String {
        s.to_string()
    }
}

/// The two limits that apply to a VM's cycle at once (its own and the agent's): the tighter
/// one, 0 when neither limits.
pub fn effective_limit(vm: u64, agent: u64) -> u64 {
    match (vm, agent) {
        (0, a) => a,
        (v, 0) => v,
        (v, a) => v.min(a),
    }
}

/// A fixed offset from UTC, in minutes (`time-zone = "UTC"` or `"+01:00"`); no daylight
/// saving: a zone that changes its offset needs the config changed with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TimeZone {
    /// Minutes east of UTC (-1439 to 1439).
    pub offset_min: i32,
}

impl TimeZone {
    /// Parse `UTC`, `Z`, or `+HH:MM` / `-HH:MM` (offsets below 24 h).
    pub fn parse(s: &str) -> Result<TimeZone, BandwidthError> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("utc") || t == "Z" {
            return Ok(TimeZone { offset_min: 0 });
        }
        let bad = || BandwidthError::BadZone(s.to_owned());
        let (sign, rest) = match t.as_bytes().first() {
            Some(b'+') => (1, &t[1..]),
            Some(b'-') => (-1, &t[1..]),
            _ => return Err(bad()),
        };
        let (h, m) = rest.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if !(0..24).contains(&h) || !(0..60).contains(&m) {
            return Err(bad());
        }
        Ok(TimeZone {
            offset_min: sign * (h * 60 + m),
        })
    }

    /// The minute of the day (0-1439) in this zone at `unix_ms`.
    pub fn minute_of_day(&self, unix_ms: u64) -> u16 {
        let utc = ((unix_ms / 60_000) % u64::from(DAY_MIN)) as i32;
        (utc + self.offset_min).rem_euclid(i32::from(DAY_MIN)) as u16
    }
}

impl std::fmt::Display for TimeZone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.offset_min == 0 {
            return write!(f, "UTC");
        }
        let sign = if self.offset_min < 0 { '-' } else { '+' };
        let a = self.offset_min.abs();
        write!(f, "{sign}{:02}:{:02}", a / 60, a % 60)
    }
}

impl TryFrom<String> for TimeZone {
    type Error = BandwidthError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        TimeZone::parse(&s)
    }
}

impl From<TimeZone> for String {
    fn from(z: TimeZone) -> String {
        z.to_string()
    }
}

fn overlaps(a: &BandwidthRange, b: &BandwidthRange) -> bool {
    a.pieces()
        .iter()
        .any(|(a0, a1)| b.pieces().iter().any(|(b0, b1)| a0 < b1 && b0 < a1))
}

fn parse_time(t: &str) -> Result<u16, BandwidthError> {
    let bad = || BandwidthError::BadTime(t.to_owned());
    let (h, m) = t.split_once(':').ok_or_else(bad)?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return Err(bad());
    }
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m >= 60 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// Parse a rate in bytes per second (see [`BandwidthSchedule::parse`]).
pub fn parse_rate(r: &str) -> Result<u64, BandwidthError> {
    let bad = || BandwidthError::BadRate(r.to_owned());
    let t = r.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let mult: u64 = match suffix {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(bad()),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)
}

/// A rate as the grammar writes it (the largest exact suffix).
pub fn rate_text(n: u64) -> String {
    for (m, s) in [
        (1u64 << 30, "Gi"),
        (1_000_000_000, "G"),
        (1 << 20, "Mi"),
        (1_000_000, "M"),
        (1 << 10, "Ki"),
        (1_000, "K"),
    ] {
        if n != 0 && n.is_multiple_of(m) {
            return format!("{}{s}", n / m);
        }
    }
    n.to_string()
}

fn hhmm(m: u16) -> String {
    format!("{:02}:{:02}", m / 60, m % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    #[test]
    fn rates() {
        let table: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("123", Some(123)),
            ("500K", Some(500_000)),
            ("500k", Some(500_000)),
            ("50M", Some(50_000_000)),
            ("1G", Some(1_000_000_000)),
            ("8Mi", Some(8 << 20)),
            ("2Ki", Some(2048)),
            ("1Gi", Some(1 << 30)),
            ("M", None),
            ("5m", None),
            ("5 M", None),
            ("-5M", None),
            ("1.5M", None),
            ("99999999999999999999G", None),
            ("", None),
        ];
        for (t, want) in table {
            assert_eq!(parse_rate(t).ok(), *want, "{t}");
            if let Some(n) = want {
                assert_eq!(parse_rate(&rate_text(*n)).ok(), Some(*n), "{t}");
            }
        }
    }

    #[test]
    fn schedules_parse_or_are_refused() {
        let ok: &[(&str, &str)] = &[
            ("08:00-18:00=50M,*=0", "08:00-18:00=50M,*=0"),
            ("10M", "*=10M"),
            ("*=8Mi", "*=8Mi"),
            ("22:00-06:00=1M", "22:00-06:00=1M,*=0"),
            (
                "18:00-24:00=5M, 00:00-06:00=7M, *=1G",
                "18:00-24:00=5M,00:00-06:00=7M,*=1G",
            ),
            ("09:00-00:00=3M", "09:00-24:00=3M,*=0"),
            (
                "08:00-12:00=1M,12:00-13:00=2M",
                "08:00-12:00=1M,12:00-13:00=2M,*=0",
            ),
        ];
        for (t, canon) in ok {
            let s = BandwidthSchedule::parse(t).unwrap_or_else(|e| panic!("{t}: {e}"));
            assert_eq!(s.to_string(), *canon, "{t}");
            assert_eq!(BandwidthSchedule::parse(canon), Ok(s), "{t}");
        }
        let bad: &[(&str, BandwidthError)] = &[
            ("", BandwidthError::Empty),
            ("fast", BandwidthError::BadRate("fast".into())),
            ("08:00=5M", BandwidthError::BadItem("08:00=5M".into())),
            ("8-18=5M", BandwidthError::BadTime("8".into())),
            ("08:00-25:00=5M", BandwidthError::BadTime("25:00".into())),
            ("08:60-09:00=5M", BandwidthError::BadTime("08:60".into())),
            ("24:00-01:00=5M", BandwidthError::BadTime("24:00".into())),
            (
                "08:00-08:00=5M",
                BandwidthError::EmptyRange("08:00-08:00".into()),
            ),
            (
                "00:00-24:00=5M",
                BandwidthError::EmptyRange("00:00-24:00".into()),
            ),
            ("*=1M,*=2M", BandwidthError::DuplicateRest),
            ("1M,*=2M", BandwidthError::DuplicateRest),
            (
                "08:00-18:00=5M,17:00-19:00=1M",
                BandwidthError::Overlap("08:00-18:00".into(), "17:00-19:00".into()),
            ),
            // A range wrapping midnight overlaps one in the small hours.
            (
                "22:00-06:00=5M,05:00-07:00=1M",
                BandwidthError::Overlap("22:00-06:00".into(), "05:00-07:00".into()),
            ),
            (
                "22:00-06:00=5M,23:00-23:30=1M",
                BandwidthError::Overlap("22:00-06:00".into(), "23:00-23:30".into()),
            ),
            (
                "20:00-04:00=5M,03:00-21:00=1M",
                BandwidthError::Overlap("20:00-04:00".into(), "03:00-21:00".into()),
            ),
        ];
        for (t, want) in bad {
            assert_eq!(BandwidthSchedule::parse(t).as_ref(), Err(want), "{t}");
        }
        // Ranges that touch do not overlap.
        assert!(BandwidthSchedule::parse("22:00-06:00=5M,06:00-22:00=1M").is_ok());
    }

    #[test]
    fn limit_in_force() {
        let s = BandwidthSchedule::parse("08:00-18:00=50M,22:00-02:00=1M,*=5M").expect("parse");
        // (minute of day, limit)
        let table: &[(u16, u64)] = &[
            (0, 1_000_000),
            (119, 1_000_000),
            (120, 5_000_000),
            (7 * 60 + 59, 5_000_000),
            (8 * 60, 50_000_000),
            (17 * 60 + 59, 50_000_000),
            (18 * 60, 5_000_000),
            (21 * 60 + 59, 5_000_000),
            (22 * 60, 1_000_000),
            (1439, 1_000_000),
        ];
        for (m, want) in table {
            assert_eq!(s.limit_at_minute(*m), *want, "minute {m}");
        }
        let unlimited_rest = BandwidthSchedule::parse("08:00-18:00=50M").expect("parse");
        assert_eq!(unlimited_rest.limit_at_minute(7 * 60), 0);
        assert!(!unlimited_rest.is_unlimited());
        assert!(
            BandwidthSchedule::parse("*=0")
                .expect("parse")
                .is_unlimited()
        );
    }

    #[test]
    fn zones_shift_the_schedule() {
        let day = 20_000 * 1440 * MIN;
        let s = BandwidthSchedule::parse("08:00-18:00=50M,*=0").expect("parse");
        // (zone, UTC minute of day, limit)
        let table: &[(&str, u64, u64)] = &[
            ("UTC", 8 * 60, 50_000_000),
            ("UTC", 7 * 60 + 59, 0),
            ("+01:00", 7 * 60, 50_000_000),
            ("+01:00", 6 * 60 + 59, 0),
            ("+01:00", 17 * 60, 0),
            ("-05:30", 13 * 60 + 30, 50_000_000),
            ("-05:30", 13 * 60 + 29, 0),
            // An offset that crosses midnight: 23:30 UTC is 09:30 at +10:00.
            ("+10:00", 23 * 60 + 30, 50_000_000),
            // 03:00 UTC is 22:00 of the day before at -05:00.
            ("-05:00", 3 * 60, 0),
        ];
        for (z, m, want) in table {
            let zone = TimeZone::parse(z).expect(z);
            assert_eq!(s.limit_at(day + m * MIN + 59_999, zone), *want, "{z} {m}");
        }
        let wrap = BandwidthSchedule::parse("22:00-06:00=1M").expect("parse");
        let minus5 = TimeZone::parse("-05:00").expect("zone");
        assert_eq!(wrap.limit_at(day + 3 * 60 * MIN, minus5), 1_000_000);
        assert_eq!(wrap.limit_at(day + 12 * 60 * MIN, minus5), 0);
    }

    #[test]
    fn zones_parse() {
        let table: &[(&str, Option<i32>)] = &[
            ("UTC", Some(0)),
            ("utc", Some(0)),
            ("Z", Some(0)),
            ("+01:00", Some(60)),
            ("-05:30", Some(-330)),
            ("+23:59", Some(1439)),
            ("+24:00", None),
            ("+1:00", None),
            ("01:00", None),
            ("CET", None),
            ("", None),
        ];
        for (t, want) in table {
            let z = TimeZone::parse(t).ok();
            assert_eq!(z.map(|z| z.offset_min), *want, "{t}");
            if let Some(z) = z {
                assert_eq!(TimeZone::parse(&z.to_string()), Ok(z), "{t}");
            }
        }
    }

    #[test]
    fn effective_is_the_tighter_limit() {
        assert_eq!(effective_limit(0, 0), 0);
        assert_eq!(effective_limit(5, 0), 5);
        assert_eq!(effective_limit(0, 7), 7);
        assert_eq!(effective_limit(5, 7), 5);
        assert_eq!(effective_limit(9, 7), 7);
    }

    #[test]
    fn serde_as_text() {
        let s = BandwidthSchedule::parse("08:00-18:00=50M,*=0").expect("parse");
        let j = serde_json::to_string(&s).expect("json");
        assert_eq!(j, "\"08:00-18:00=50M,*=0\"");
        assert_eq!(
            serde_json::from_str::<BandwidthSchedule>(&j).expect("back"),
            s
        );
        assert!(serde_json::from_str::<BandwidthSchedule>("\"x\"").is_err());
    }
}
