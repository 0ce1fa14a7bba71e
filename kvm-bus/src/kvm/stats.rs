//! Per-vCPU exit statistics and a small latency summary.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Counters of one vCPU's exits, written by the thread that runs the vCPU
/// (through [`run_vcpu`](super::run_vcpu) / [`run_once`](super::run_once))
/// and readable at any time by any thread (the VMM's monitor) with
/// [`snapshot`](VcpuStats::snapshot). Share it with an `Arc`.
///
/// Updates are relaxed loads and stores, not read-modify-writes: one
/// writer per `VcpuStats` is assumed (one vCPU thread). Two threads
/// updating the same `VcpuStats` may lose counts, never corrupt memory.
#[derive(Debug, Default)]
pub struct VcpuStats {
    exits: AtomicU64,
    io_exits: AtomicU64,
    mmio_exits: AtomicU64,
    handled: AtomicU64,
    unhandled_reads: AtomicU64,
    unhandled_writes: AtomicU64,
    device_panics: AtomicU64,
    dispatch_ns: AtomicU64,
    /// The vCPU these counters belong to, passed to handlers in
    /// [`Access::vcpu`](crate::Access).
    vcpu: Option<u32>,
}

/// A copy of a [`VcpuStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Returns from `KVM_RUN` (every exit reason).
    pub exits: u64,
    /// `KVM_EXIT_IO` exits (one per `in`/`out`, one per `rep ins`/`rep outs`
    /// batch).
    pub io_exits: u64,
    /// `KVM_EXIT_MMIO` exits.
    pub mmio_exits: u64,
    /// Accesses a device accepted (a string I/O exit of `count` elements is
    /// `count` accesses).
    pub handled: u64,
    /// Reads no device accepted (the guest got all-ones).
    pub unhandled_reads: u64,
    /// Writes no device accepted (dropped).
    pub unhandled_writes: u64,
    /// Exits on which a device handler panicked (each one returned as
    /// [`VmExit::DevicePanicked`](super::VmExit::DevicePanicked); its
    /// accesses are counted as unhandled too).
    pub device_panics: u64,
    /// Total time spent dispatching I/O and MMIO exits (read lock to read
    /// unlock, device calls included), in nanoseconds.
    pub dispatch_ns: u64,
}

impl StatsSnapshot {
    /// I/O plus MMIO exits.
    pub fn dispatched_exits(&self) -> u64 {
        self.io_exits + self.mmio_exits
    }

    /// Unhandled reads plus writes.
    pub fn unhandled(&self) -> u64 {
        self.unhandled_reads + self.unhandled_writes
    }

    /// Mean dispatch time per I/O or MMIO exit, in nanoseconds (0 if none).
    pub fn mean_dispatch_ns(&self) -> u64 {
        self.dispatch_ns
            .checked_div(self.dispatched_exits())
            .unwrap_or(0)
    }
}

fn bump(c: &AtomicU64, by: u64) {
    // Single writer: a load and a store, no locked instruction.
    c.store(c.load(Relaxed).wrapping_add(by), Relaxed);
}

impl VcpuStats {
    /// All counters zero, for a vCPU whose index handlers need not know
    /// ([`Access::vcpu`](crate::Access) is `None`).
    pub fn new() -> VcpuStats {
        VcpuStats::default()
    }

    /// All counters zero, for vCPU `index`: the exit adapter passes the
    /// index to handlers in [`Access::vcpu`](crate::Access).
    ///
    /// ```
    /// let stats = kvm_bus::kvm::VcpuStats::for_vcpu(3);
    /// assert_eq!(stats.vcpu(), Some(3));
    /// ```
    pub fn for_vcpu(index: u32) -> VcpuStats {
        VcpuStats {
            vcpu: Some(index),
            ..VcpuStats::default()
        }
    }

    /// The vCPU index given to [`for_vcpu`](VcpuStats::for_vcpu).
    pub fn vcpu(&self) -> Option<u32> {
        self.vcpu
    }

    /// Reads every counter (each one atomically; the set is not a single
    /// atomic snapshot while the vCPU runs).
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            exits: self.exits.load(Relaxed),
            io_exits: self.io_exits.load(Relaxed),
            mmio_exits: self.mmio_exits.load(Relaxed),
            handled: self.handled.load(Relaxed),
            unhandled_reads: self.unhandled_reads.load(Relaxed),
            unhandled_writes: self.unhandled_writes.load(Relaxed),
            device_panics: self.device_panics.load(Relaxed),
            dispatch_ns: self.dispatch_ns.load(Relaxed),
        }
    }

    pub(crate) fn exit(&self) {
        bump(&self.exits, 1);
    }
    pub(crate) fn io_exit(&self) {
        bump(&self.io_exits, 1);
    }
    pub(crate) fn mmio_exit(&self) {
        bump(&self.mmio_exits, 1);
    }
    pub(crate) fn add(&self, handled: u64, unhandled_reads: u64, unhandled_writes: u64) {
        if handled != 0 {
            bump(&self.handled, handled);
        }
        if unhandled_reads != 0 {
            bump(&self.unhandled_reads, unhandled_reads);
        }
        if unhandled_writes != 0 {
            bump(&self.unhandled_writes, unhandled_writes);
        }
    }
    pub(crate) fn device_panic(&self) {
        bump(&self.device_panics, 1);
    }
    pub(crate) fn dispatch_time(&self, ns: u64) {
        bump(&self.dispatch_ns, ns);
    }
}

/// Summary of a set of latency samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    /// Number of samples.
    pub samples: usize,
    /// Median.
    pub median: Duration,
    /// 99th percentile (nearest rank).
    pub p99: Duration,
    /// Largest sample.
    pub max: Duration,
    /// Arithmetic mean.
    pub mean: Duration,
}

impl Latency {
    /// Summarises `samples` (sorts them in place). All zero if empty.
    pub fn from_samples(samples: &mut [Duration]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        let total: Duration = samples.iter().sum();
        Latency {
            samples: n,
            median: samples[n / 2],
            p99: samples[((n * 99).div_ceil(100)).clamp(1, n) - 1],
            max: samples[n - 1],
            mean: total / n as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_summary() {
        let mut s: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let l = Latency::from_samples(&mut s);
        assert_eq!(l.samples, 100);
        assert_eq!(l.median, Duration::from_micros(51));
        assert_eq!(l.p99, Duration::from_micros(99));
        assert_eq!(l.max, Duration::from_micros(100));
        assert_eq!(Latency::from_samples(&mut []), Latency::default());
    }

    #[test]
    fn stats_counts() {
        let s = VcpuStats::new();
        s.exit();
        s.io_exit();
        s.add(3, 1, 2);
        s.dispatch_time(300);
        let snap = s.snapshot();
        assert_eq!(snap.handled, 3);
        assert_eq!(snap.unhandled(), 3);
        assert_eq!(snap.mean_dispatch_ns(), 300);
    }
}
