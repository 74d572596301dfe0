//! Names of the data files workers write, `fr-<cycle>-<task>-<attempt>-<unique>.parquet`:
//! built and parsed here only. Workers name their outputs with [`OutputName::new`]; the
//! coordinator's orphan sweeper recognises a cycle's files with [`OutputName::parse`].

use std::fmt;

/// What every output file name starts with.
pub const OUTPUT_PREFIX: &str = "fr-";
/// What every output file name ends with.
pub const OUTPUT_SUFFIX: &str = ".parquet";

/// The parts of an output file's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputName {
    /// The cycle that planned the task (may itself contain '-', as UUIDs do).
    pub cycle_id: String,
    /// The task within the cycle.
    pub task_id: u64,
    /// The attempt of the task (from 1).
    pub attempt: u32,
    /// Unique per file (a simple UUID: hex digits, no '-').
    pub unique: String,
}

impl OutputName {
    /// A new file's name for `attempt` of `task_id` in `cycle_id`, unique by a fresh UUID.
    pub fn new(cycle_id: &str, task_id: u64, attempt: u32) -> Self {
        OutputName {
            cycle_id: cycle_id.to_string(),
            task_id,
            attempt,
            unique: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// Parses a file name (or the last segment of a path); `None` when it is not the name
    /// of an output file.
    pub fn parse(name: &str) -> Option<Self> {
        let file = name.rsplit('/').next().unwrap_or(name);
        let stem = file
            .strip_prefix(OUTPUT_PREFIX)?
            .strip_suffix(OUTPUT_SUFFIX)?;
        let mut parts = stem.rsplitn(4, '-');
        let unique = parts.next()?;
        let attempt = parts.next()?;
        let task = parts.next()?;
        let cycle_id = parts.next()?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if cycle_id.is_empty()
            || unique.is_empty()
            || !unique.bytes().all(|b| b.is_ascii_alphanumeric())
            || !digits(task)
            || !digits(attempt)
        {
            return None;
        }
        Some(OutputName {
            cycle_id: cycle_id.to_string(),
            task_id: task.parse().ok()?,
            attempt: attempt.parse().ok()?,
            unique: unique.to_string(),
        })
    }

    /// Whether `name` (a file name or path) is an output file of `cycle_id`.
    pub fn is_of_cycle(name: &str, cycle_id: &str) -> bool {
        Self::parse(name).is_some_and(|n| n.cycle_id == cycle_id)
    }
}

impl fmt::Display for OutputName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{OUTPUT_PREFIX}{}-{}-{}-{}{OUTPUT_SUFFIX}",
            self.cycle_id, self.task_id, self.attempt, self.unique
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_strangers_are_refused() {
        let cycle = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
        let n = OutputName::new(cycle, 17, 2);
        let s = n.to_string();
        assert!(s.starts_with(&format!("fr-{cycle}-17-2-")), "{s}");
        assert!(s.ends_with(".parquet"), "{s}");
        assert_eq!(OutputName::parse(&s), Some(n.clone()));
        assert_eq!(OutputName::parse(&format!("p=1/q=x/{s}")), Some(n));
        assert!(OutputName::is_of_cycle(&s, cycle));
        // A cycle id that is a prefix of another is not the other.
        assert!(!OutputName::is_of_cycle(&s, "0190a1b2-c3d4"));
        assert!(!OutputName::is_of_cycle(&s, &format!("{cycle}-17")));
        let short = OutputName::new("c", 0, 1).to_string();
        assert_eq!(OutputName::parse(&short).unwrap().cycle_id, "c");
        for bad in [
            "part-0000.parquet",
            "fr-c-1-1-abc.json",
            "fr-c-1-abc.parquet",
            "fr--1-1-abc.parquet",
            "fr-c-x-1-abc.parquet",
            "fr-c-1-1-.parquet",
            "fr-c-1-1-a-b.parquet",
            "fr-c-1-99999999999-abc.parquet",
        ] {
            assert_eq!(OutputName::parse(bad), None, "{bad}");
        }
    }
}
