//! Section 2: grace periods (`synchronize` idle, under read load, with a
//! long section, against one reader holding a section; `synchronize_expedited`;
//! `call_srcu` throughput and batch size), for both flavors, with their
//! side effects (`membarrier` calls, CPU burnt while waiting) from
//! [`Srcu::stats`] deltas taken around the same calls that are timed, and
//! the physical floor of a fast grace period (one bare `membarrier` call).

use crate::harness::{thread_cpu_ns, time_ns, with_background, Stats};
use srcu::{Flavor, Srcu, SrcuStats};
use std::hint::black_box;
use std::sync::atomic::{
    AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::time::{Duration, Instant};

/// How long a waiting grace period spins and yields before it sleeps
/// (srcu's `YIELD_UNTIL`): CPU fractions are taken over the wait beyond it.
pub const SPIN_PHASE: Duration = Duration::from_micros(100);

/// Timed calls and what they cost besides time.
#[derive(Clone, Debug)]
pub struct Measured {
    /// Wall-clock ns per call.
    pub latency: Stats,
    /// `srcu.stats()` after the calls minus before (warm-up excluded).
    pub delta: SrcuStats,
}

impl Measured {
    /// `membarrier` calls per completed grace period.
    pub fn membarriers_per_gp(&self) -> f64 {
        ratio(self.delta.membarriers, self.delta.grace_periods)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        f64::NAN
    } else {
        a as f64 / b as f64
    }
}

/// Runs `f` between two snapshots of `srcu.stats()`.
pub fn with_stats<F: Flavor, R>(srcu: &Srcu<F>, f: impl FnOnce() -> R) -> (R, SrcuStats) {
    let before = srcu.stats();
    let r = f();
    (r, srcu.stats().since(&before))
}

/// A fresh domain of flavor `F` with its callback worker already started
/// (so no measurement pays for the thread spawn).
pub fn domain<F: Flavor>() -> Srcu<F> {
    let s = Srcu::<F>::builder().build();
    s.call_srcu(|| {});
    s.barrier();
    s
}

/// `reps` idle `synchronize` (or `synchronize_expedited`) calls (no reader
/// anywhere) after one warm-up call, each timed, with the statistics delta
/// of exactly those calls.
pub fn idle<F: Flavor>(srcu: &Srcu<F>, reps: usize, expedited: bool) -> Measured {
    if expedited {
        srcu.synchronize_expedited();
    } else {
        srcu.synchronize();
    }
    let (latency, delta) = with_stats(srcu, || sample_synchronize(srcu, reps, expedited));
    Measured { latency, delta }
}

/// One grace period waiting for one reader, see [`against_reader`].
#[derive(Clone, Copy, Debug)]
pub struct ReaderWait {
    /// Wall-clock ns of the `synchronize` call.
    pub latency_ns: f64,
    /// ns from the reader's leaving its section to `synchronize` returning.
    pub overshoot_ns: f64,
    /// The caller's thread-CPU ns across the call (`CLOCK_THREAD_CPUTIME_ID`
    /// read just before and just after it).
    pub caller_cpu_ns: f64,
    /// `srcu.stats()` delta across the call.
    pub delta: SrcuStats,
}

impl ReaderWait {
    /// From the statistics: CPU the waiting thread burnt in its waits, as a
    /// fraction of their wall time beyond the first [`SPIN_PHASE`] of each
    /// (the spin itself is counted in the CPU time: an upper bound).
    pub fn wait_cpu_frac(&self) -> f64 {
        let d = &self.delta;
        let spin = SPIN_PHASE.as_nanos() as u64 * d.waits;
        if d.waits == 0 {
            return f64::NAN;
        }
        d.wait_cpu_ns as f64 / d.wait_wall_ns.saturating_sub(spin).max(1) as f64
    }

    /// Cross-check measured by the caller: its CPU time across the whole
    /// call as a fraction of the call's wall time beyond [`SPIN_PHASE`].
    pub fn caller_cpu_frac(&self) -> f64 {
        self.caller_cpu_ns / (self.latency_ns - SPIN_PHASE.as_nanos() as f64).max(1.0)
    }
}

/// One `synchronize` (or `synchronize_expedited`) call waiting for one
/// reader: a new thread enters a read section and sleeps in it for
/// `section` (a blocked reader: SRCU's point); the caller starts the grace
/// period as soon as it sees the reader inside (a few µs later), so the
/// call waits for about `section`.
pub fn against_reader<F: Flavor>(srcu: &Srcu<F>, section: Duration, expedited: bool) -> ReaderWait {
    let inside = AtomicBool::new(false);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let g = srcu.read_lock();
            inside.store(true, Release);
            std::thread::sleep(section);
            let left = Instant::now();
            drop(g);
            left
        });
        while !inside.load(Acquire) {
            std::thread::yield_now();
        }
        let before = srcu.stats();
        let c0 = thread_cpu_ns();
        let t0 = Instant::now();
        if expedited {
            srcu.synchronize_expedited();
        } else {
            srcu.synchronize();
        }
        let done = Instant::now();
        let c1 = thread_cpu_ns();
        let delta = srcu.stats().since(&before);
        let left = reader.join().expect("reader thread");
        ReaderWait {
            latency_ns: (done - t0).as_nanos() as f64,
            overshoot_ns: done.saturating_duration_since(left).as_nanos() as f64,
            caller_cpu_ns: (c1 - c0) as f64,
            delta,
        }
    })
}

/// `synchronize` (or `synchronize_expedited`) while `readers` threads
/// continuously enter and leave empty read sections; also returns the
/// number of sections the readers completed meanwhile.
pub fn synchronize_busy<F: Flavor>(
    srcu: &Srcu<F>,
    readers: usize,
    reps: usize,
    expedited: bool,
) -> (Stats, u64) {
    with_background(
        readers,
        || drop(black_box(srcu.read_lock())),
        || {
            // Let the readers get going before the first sample.
            std::thread::sleep(Duration::from_millis(1));
            sample_synchronize(srcu, reps, expedited)
        },
    )
}

/// `synchronize` while one thread holds back-to-back read sections of
/// `section` each (spinning inside, so the section is exactly that long).
pub fn synchronize_long_section<F: Flavor>(
    srcu: &Srcu<F>,
    section: Duration,
    reps: usize,
    expedited: bool,
) -> Stats {
    with_background(
        1,
        || {
            let g = srcu.read_lock();
            let t0 = Instant::now();
            while t0.elapsed() < section {
                std::hint::spin_loop();
            }
            drop(g);
        },
        || {
            std::thread::sleep(section / 2);
            sample_synchronize(srcu, reps, expedited)
        },
    )
    .0
}

/// `call_srcu` throughput and batching.
#[derive(Clone, Copy, Debug)]
pub struct CallSrcu {
    /// ns per `call_srcu` call (enqueue; the caller never waits).
    pub enqueue_ns: f64,
    /// ns from the first `call_srcu` until `barrier` returned, per callback.
    pub retire_ns: f64,
    /// Callbacks retired per grace period during the burst.
    pub per_gp: f64,
}

/// Queues `n` callbacks (each drops a `Box<u64>` and bumps a counter) as
/// fast as possible, then waits for them with `barrier`.
pub fn call_srcu_burst<F: Flavor>(srcu: &Srcu<F>, n: u64) -> CallSrcu {
    static RAN: AtomicU64 = AtomicU64::new(0);
    srcu.barrier();
    let gp0 = srcu.completed_grace_periods();
    let t0 = Instant::now();
    for i in 0..n {
        let b = Box::new(i);
        srcu.call_srcu(move || {
            black_box(b);
            RAN.fetch_add(1, Relaxed);
        });
    }
    let enq = t0.elapsed();
    srcu.barrier();
    let all = t0.elapsed();
    let gps = srcu.completed_grace_periods() - gp0;
    CallSrcu {
        enqueue_ns: enq.as_nanos() as f64 / n as f64,
        retire_ns: all.as_nanos() as f64 / n as f64,
        per_gp: n as f64 / gps.max(1) as f64,
    }
}

/// `reps` timed calls of `synchronize` (or `synchronize_expedited`).
fn sample_synchronize<F: Flavor>(srcu: &Srcu<F>, reps: usize, expedited: bool) -> Stats {
    Stats::collect(reps, || {
        time_ns(|| {
            if expedited {
                srcu.synchronize_expedited()
            } else {
                srcu.synchronize()
            }
        })
    })
}

/// The bare `membarrier(2)` the fast flavor's grace periods are made of
/// (srcu's own call, `srcu::__private::bare_membarrier`).
pub mod membarrier {
    use crate::harness::{time_ns, Stats};

    /// True if the process can use `MEMBARRIER_CMD_PRIVATE_EXPEDITED`
    /// (registered once; srcu has usually done it already).
    pub fn available() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(srcu::__private::bare_membarrier)
    }

    /// One `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0)`; panics if it
    /// fails after [`available`] said yes.
    #[inline(never)]
    pub fn private_expedited() {
        assert!(
            srcu::__private::bare_membarrier(),
            "membarrier: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Wall-clock ns of `reps` single calls (as the grace periods are
    /// timed), or `None` if `membarrier` is unavailable.
    pub fn call_ns(reps: usize) -> Option<Stats> {
        if !available() {
            return None;
        }
        private_expedited();
        Some(Stats::collect(reps, || time_ns(private_expedited)))
    }
}
