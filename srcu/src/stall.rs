//! Stall reports: a grace period that waits too long says so, once.

use std::sync::Arc;
use std::time::Duration;

/// What a stalled grace period reports to the hook set with
/// [`Builder::on_stall`](crate::Builder::on_stall).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StallReport {
    /// How long the grace period has waited so far.
    pub waited: Duration,
    /// Read sections still inside the index being drained.
    pub readers: usize,
    /// Number of the grace period (1 for the first).
    pub grace_period: u64,
}

impl core::fmt::Display for StallReport {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "srcu: grace period {} stalled for {:.3} s waiting for {} reader(s)",
            self.grace_period,
            self.waited.as_secs_f64(),
            self.readers
        )
    }
}

pub(crate) type StallHook = Arc<dyn Fn(&StallReport) + Send + Sync>;

pub(crate) fn default_hook() -> StallHook {
    Arc::new(|r: &StallReport| eprintln!("{r}"))
}
