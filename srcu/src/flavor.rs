//! The two flavors, as types, and the modes a domain can end up in.

mod sealed {
    pub trait Sealed {}
}

/// How readers pay for ordering. Implemented by [`Classic`] and [`Fast`]
/// only.
///
/// # Which one to pick
///
/// * [`Classic`] (the default): readers execute one full barrier (a locked
///   add on x86_64) on `read_lock`; grace periods are cheap (a few hundred
///   ns when idle). Pick it when updates are frequent or latency-critical,
///   or when the process may not use `membarrier` (seccomp).
/// * [`Fast`]: readers execute no fence at all (two non-locked per-CPU adds
///   in restartable sequences, within about 10% of the cost of those two
///   adds alone, a few ns per section); every grace period
///   issues a few `membarrier` system calls, each of which interrupts every
///   CPU running a thread of the process (microseconds, more in a VM). Pick
///   it when reads vastly outnumber updates, as vCPU exits outnumber device
///   hot-plug. [`crate::ReadGuard::mb_after_read_lock`] is a real fence here.
pub trait Flavor: sealed::Sealed + Send + Sync + 'static {
    /// True if readers run without fences and the grace period uses
    /// `membarrier` instead.
    const FAST: bool;
    /// A short name for reports.
    const NAME: &'static str;
}

/// Full barrier in `read_lock`; see [`Flavor`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Classic;

/// No reader fences; `membarrier` on the grace-period side; see [`Flavor`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fast;

impl sealed::Sealed for Classic {}
impl sealed::Sealed for Fast {}

impl Flavor for Classic {
    const FAST: bool = false;
    const NAME: &'static str = "classic";
}

impl Flavor for Fast {
    const FAST: bool = true;
    const NAME: &'static str = "fast";
}

/// Which barriers a domain's readers actually execute; see
/// [`crate::Srcu::reader_mode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReaderMode {
    /// Readers execute barrier B (a full barrier) in `read_lock`.
    FullBarrier,
    /// Readers execute no fence; grace periods use `membarrier`.
    Membarrier,
}

/// How a domain's per-CPU counters are incremented; see
/// [`crate::Srcu::counter_path`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterPath {
    /// Restartable sequences on the slot of the current CPU (x86_64 Linux
    /// with glibc 2.35+).
    Rseq,
    /// Atomic read-modify-writes on a slot picked by CPU or thread hint.
    Atomic,
}
