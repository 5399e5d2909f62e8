//! The campaign's table and its section of RELIABILITY.md: what each fault does, how
//! vmreplica answers it, and the results of the last run, between markers so that the rest
//! of the file (another section, e.g. "Fuzzing") is kept.

use std::path::Path;

use crate::faults::{Fault, Trial};

const BEGIN: &str = "<!-- vmr-faults:begin (written by vmr-faults --write) -->";
const END: &str = "<!-- vmr-faults:end -->";

/// One row of the table.
#[derive(Debug)]
pub struct Row {
    /// The fault.
    pub fault: Fault,
    /// Its trials' outcomes (empty: not run).
    pub trials: Vec<Trial>,
}

impl Row {
    /// Failed trials.
    pub fn failures(&self) -> usize {
        self.trials.iter().filter(|t| t.failure.is_some()).count()
    }
}

/// The results table (markdown) with the first failure of each failing fault below it.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| Fault | Trials | Failures | Data lost | Guest write errors | Mean trial | Notes |\n\
         |---|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        if r.trials.is_empty() {
            s.push_str(&format!("| {} | not run | | | | | |\n", r.fault.label()));
            continue;
        }
        let lost = r.trials.iter().filter(|t| t.data_lost).count();
        let werr = r.trials.iter().filter(|t| t.write_error.is_some()).count();
        let mean = r.trials.iter().map(|t| t.secs).sum::<f64>() / r.trials.len() as f64;
        let mid = r.trials.iter().filter(|t| t.mid_cycle).count();
        let mut notes = Vec::new();
        if matches!(r.fault, Fault::KillReplica | Fault::KillPrimary) {
            notes.push(format!("{mid} kills with a cycle in flight"));
        }
        if let Some(n) = r.trials.iter().rev().find_map(|t| t.note.clone()) {
            notes.push(format!("last: {n}"));
        }
        let notes = notes.join("; ");
        s.push_str(&format!(
            "| {} | {} | {} | {lost} | {werr} | {mean:.0} s | {notes} |\n",
            r.fault.label(),
            r.trials.len(),
            r.failures(),
        ));
    }
    let failed: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let (i, t) = r
                .trials
                .iter()
                .enumerate()
                .find(|(_, t)| t.failure.is_some())?;
            Some(format!(
                "- {}, trial {}: {}",
                r.fault.label(),
                i + 1,
                t.failure
                    .as_deref()
                    .unwrap_or_default()
                    .replace('\n', " / ")
            ))
        })
        .collect();
    if !failed.is_empty() {
        s.push_str("\nFirst failure of each failing fault:\n\n");
        s.push_str(&failed.join("\n"));
        s.push('\n');
    }
    s
}

/// What each fault does to the system and how vmreplica answers it.
pub const FAULTS_DOC: &str = include_str!("faults.md");

/// The whole section: heading, description, the run's facts and the table.
pub fn section(run: &str, table: &str) -> String {
    format!("{BEGIN}\n## Fault campaign\n\n{FAULTS_DOC}\n### Last run\n\n{run}\n\n{table}{END}\n")
}

/// Replace the campaign's section of `path` (or append it; create the file with a title).
pub fn write_section(path: &Path, section: &str) -> std::io::Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# Reliability\n\nHow vmreplica is tested against faults and hostile input.\n".into()
        }
        Err(e) => return Err(e),
    };
    std::fs::write(path, splice(&old, section))
}

fn splice(old: &str, section: &str) -> String {
    match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if e > b => {
            let after = &old[e + END.len()..];
            let after = after.strip_prefix('\n').unwrap_or(after);
            format!("{}{section}{after}", &old[..b])
        }
        _ => {
            let sep = if old.ends_with("\n\n") {
                ""
            } else if old.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{old}{sep}{section}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_appended_once_and_then_replaced_keeping_other_sections() {
        let other = "# Reliability\n\n## Fuzzing\n\nfuzz table\n";
        let one = splice(other, &section("run 1", "table 1\n"));
        assert!(one.starts_with(other), "{one}");
        let two = splice(&one, &section("run 2", "table 2\n"));
        assert!(two.contains("## Fuzzing\n\nfuzz table") && two.contains("table 2"));
        assert!(!two.contains("table 1"), "{two}");
        assert_eq!(two.matches(BEGIN).count(), 1);
        let three = splice(&format!("{two}\n## Later\n"), &section("run 3", "t3\n"));
        assert!(
            three.ends_with("\n## Later\n") && three.contains("t3"),
            "{three}"
        );
    }

    #[test]
    fn the_table_counts_failures_lost_data_and_write_errors() {
        let rows = [Row {
            fault: Fault::KillReplica,
            trials: vec![
                Trial::default(),
                Trial {
                    failure: Some("lost".into()),
                    data_lost: true,
                    write_error: Some("EIO".into()),
                    secs: 4.0,
                    mid_cycle: true,
                    note: None,
                },
            ],
        }];
        let t = table(&rows);
        assert!(
            t.contains("| 1. SIGKILL of the replica agent | 2 | 1 | 1 | 1 | 2 s | 1 kills with a cycle in flight |"),
            "{t}"
        );
        assert!(t.contains("trial 2: lost"), "{t}");
    }
}
