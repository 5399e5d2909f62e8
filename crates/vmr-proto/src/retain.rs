//! The grid retention policy (`--retain 1h=24,1d=7,1w=4,1mo=12`): its rules, the one parser of
//! its grammar and its canonical text (docs/retention.md). The policy's meaning, which points
//! it keeps, is `vmr_store::retention`.

use serde::{Deserialize, Serialize};

/// The unit of a grid period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeriodUnit {
    /// `s`: seconds (for tests and very short frequencies).
    Second,
    /// `min`: minutes.
    Minute,
    /// `h`: hours.
    Hour,
    /// `d`: UTC days.
    Day,
    /// `w`: ISO weeks (Monday 00:00 UTC to Monday).
    Week,
    /// `mo`: calendar months (UTC), of unequal length.
    Month,
    /// `y`: calendar years (UTC).
    Year,
}

impl PeriodUnit {
    /// The suffix of the unit in the grammar.
    pub fn suffix(self) -> &'static str {
        match self {
            PeriodUnit::Second => "s",
            PeriodUnit::Minute => "min",
            PeriodUnit::Hour => "h",
            PeriodUnit::Day => "d",
            PeriodUnit::Week => "w",
            PeriodUnit::Month => "mo",
            PeriodUnit::Year => "y",
        }
    }

    fn from_suffix(s: &str) -> Option<PeriodUnit> {
        Some(match s {
            "s" => PeriodUnit::Second,
            "min" => PeriodUnit::Minute,
            "h" => PeriodUnit::Hour,
            "d" => PeriodUnit::Day,
            "w" => PeriodUnit::Week,
            "mo" => PeriodUnit::Month,
            "y" => PeriodUnit::Year,
            _ => return None,
        })
    }
}

/// A period length: `n` units (`10s`, `1h`, `3mo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Period {
    /// How many units (at least 1).
    pub n: u32,
    /// The unit.
    pub unit: PeriodUnit,
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.n, self.unit.suffix())
    }
}

/// One rule of a grid: keep the last point of each of the `keep` most recent periods of
/// length `period` that hold a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GridRule {
    /// The period.
    pub period: Period,
    /// How many periods (at least 1).
    pub keep: u32,
}

impl std::fmt::Display for GridRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.period, self.keep)
    }
}

impl From<GridRule> for String {
    fn from(r: GridRule) -> String {
        r.to_string()
    }
}

impl TryFrom<String> for GridRule {
    type Error = RetainSpecError;
    fn try_from(s: String) -> Result<GridRule, RetainSpecError> {
        GridRule::parse(&s)
    }
}

/// Largest count of one rule and largest `n` of a period.
pub const MAX_GRID_COUNT: u32 = 100_000;

impl GridRule {
    /// Parse one `PERIOD=COUNT` rule.
    pub fn parse(s: &str) -> Result<GridRule, RetainSpecError> {
        let bad = |why: &'static str| RetainSpecError::Rule {
            rule: s.to_owned(),
            why,
        };
        let (p, c) = s
            .split_once('=')
            .ok_or_else(|| bad("expected PERIOD=COUNT"))?;
        let p = p.trim();
        let digits = p.find(|c: char| !c.is_ascii_digit()).unwrap_or(p.len());
        let (num, suffix) = p.split_at(digits);
        let n: u32 = num
            .parse()
            .map_err(|_| bad("the period must start with a number"))?;
        let unit = match PeriodUnit::from_suffix(suffix) {
            Some(u) => u,
            None if suffix == "m" => {
                return Err(bad(
                    "`m` is ambiguous: write `min` for minutes or `mo` for months",
                ));
            }
            None => return Err(bad("unknown unit (use s, min, h, d, w, mo or y)")),
        };
        let keep: u32 = c
            .trim()
            .parse()
            .map_err(|_| bad("the count must be a number"))?;
        if n == 0 || n > MAX_GRID_COUNT {
            return Err(bad("the period must be 1 to 100000 units"));
        }
        if keep == 0 || keep > MAX_GRID_COUNT {
            return Err(bad("the count must be 1 to 100000"));
        }
        Ok(GridRule {
            period: Period { n, unit },
            keep,
        })
    }
}

/// A grid retention policy: its rules in the order given, and whether a period keeps its
/// last app-consistent point rather than its last point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetentionGrid {
    /// The rules (at least one, no period twice).
    pub rules: Vec<GridRule>,
    /// Within a period that holds an app-consistent (or planned) point, keep the last such
    /// point instead of the period's last point.
    #[serde(default)]
    pub prefer_app_consistent: bool,
}

impl RetentionGrid {
    /// Parse `PERIOD=COUNT[,PERIOD=COUNT...]` (the `--retain` argument).
    pub fn parse(
        spec: &str,
        prefer_app_consistent: bool,
    ) -> Result<RetentionGrid, RetainSpecError> {
        let mut rules: Vec<GridRule> = Vec::new();
        for part in spec.split(',') {
            let r = GridRule::parse(part.trim())?;
            if rules.iter().any(|o| o.period == r.period) {
                return Err(RetainSpecError::Duplicate {
                    period: r.period.to_string(),
                });
            }
            rules.push(r);
        }
        Ok(RetentionGrid {
            rules,
            prefer_app_consistent,
        })
    }

    /// The rules as the grammar writes them (`1h=24,1d=7`).
    pub fn spec(&self) -> String {
        self.rules
            .iter()
            .map(GridRule::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl std::fmt::Display for RetentionGrid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.spec())?;
        if self.prefer_app_consistent {
            f.write_str(" (prefer app-consistent)")?;
        }
        Ok(())
    }
}

/// A `--retain` argument that is not a grid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetainSpecError {
    /// One rule does not parse.
    #[error("bad retention rule {rule:?}: {why}")]
    Rule {
        /// The rule as given.
        rule: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A period is given twice.
    #[error("retention period {period} is given twice")]
    Duplicate {
        /// The period.
        period: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        let g = RetentionGrid::parse("1h=24, 1d=7,1w=4,1mo=12,10s=3,2min=5,1y=2", false)
            .expect("parses");
        assert_eq!(g.spec(), "1h=24,1d=7,1w=4,1mo=12,10s=3,2min=5,1y=2");
        assert_eq!(
            g.rules[4],
            GridRule {
                period: Period {
                    n: 10,
                    unit: PeriodUnit::Second
                },
                keep: 3
            }
        );
        for bad in [
            "",
            "1h",
            "h=3",
            "1m=12",
            "1x=2",
            "0h=2",
            "1h=0",
            "1h=-1",
            "1h=2,1h=3",
            "1.5h=2",
            "1h=1000001",
        ] {
            assert!(
                RetentionGrid::parse(bad, false).is_err(),
                "{bad:?} accepted"
            );
        }
        let e = RetentionGrid::parse("1m=12", false).expect_err("ambiguous");
        assert!(e.to_string().contains("`min`"), "{e}");
    }

    #[test]
    fn serde_is_the_grammar() {
        let g = RetentionGrid::parse("1h=24,1mo=12", true).expect("parses");
        let j = serde_json::to_string(&g).expect("json");
        assert_eq!(
            j,
            r#"{"rules":["1h=24","1mo=12"],"prefer-app-consistent":true}"#
        );
        assert_eq!(serde_json::from_str::<RetentionGrid>(&j).expect("back"), g);
        assert!(serde_json::from_str::<RetentionGrid>(r#"{"rules":["1m=2"]}"#).is_err());
    }
}
