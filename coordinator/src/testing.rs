//! Test switches of the coordinator: crash points, armed in-process by tests or by the
//! `[testing] crash_at` setting of a process started with `--allow-fault-injection` (never
//! read from the environment).

use std::sync::Mutex;

use freshet_common::error::{Error, Result};

/// Points where tests inject a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Workers wrote their files; the commit has not happened.
    AfterRewrite,
    /// The commit happened; staging cleanup has not.
    AfterCommit,
}

impl std::str::FromStr for CrashPoint {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "after_rewrite" => Ok(CrashPoint::AfterRewrite),
            "after_commit" => Ok(CrashPoint::AfterCommit),
            _ => Err(Error::Config(format!(
                "unknown crash point '{s}' (after_rewrite, after_commit)"
            ))),
        }
    }
}

/// The armed crash point of a term, if any: (where, abort the process or fail the cycle).
#[derive(Debug, Default)]
pub struct CrashSwitch(Mutex<Option<(CrashPoint, bool)>>);

impl CrashSwitch {
    /// A switch armed at `at` (`abort`: abort the process there, as a real crash would).
    pub fn new(at: Option<CrashPoint>, abort: bool) -> Self {
        CrashSwitch(Mutex::new(at.map(|p| (p, abort))))
    }

    /// Arms (or disarms) an in-process crash point: the cycle that reaches it fails.
    pub fn set(&self, at: Option<CrashPoint>) {
        *self.0.lock().expect("lock") = at.map(|p| (p, false));
    }

    /// Whether `p` is armed, and whether to abort there.
    pub fn armed(&self, p: CrashPoint) -> Option<bool> {
        match *self.0.lock().expect("lock") {
            Some((at, abort)) if at == p => Some(abort),
            _ => None,
        }
    }
}
