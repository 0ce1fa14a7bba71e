//! Timing primitives shared by the criterion benches and `bench-report`.
//!
//! * [`ns_per_op`]: one timed batch of `iters` calls on this thread.
//! * [`concurrent_for`]: `n` threads run the same operation at once for the
//!   same wall-clock duration; per-thread ns per op (what each vCPU pays).
//! * [`concurrent_fixed`]: the same with a fixed number of operations per
//!   thread, for criterion's `iter_custom`.
//! * [`with_background`]: runs a body while `n` threads hammer an operation
//!   (readers entering and leaving sections, vCPUs dispatching).
//! * [`Stats`]: median of repetitions.
//!
//! Nothing is pinned: the threads float over the machine's CPUs as vCPU
//! threads of a VMM do.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Times `iters` calls of `op` and returns nanoseconds per call.
#[inline(never)]
pub fn ns_per_op(iters: u64, mut op: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        op();
    }
    start.elapsed().as_nanos() as f64 / iters.max(1) as f64
}

/// Runs `op` in `threads` threads concurrently for `dur` (started together
/// behind a barrier, stopped together by a flag) and returns the mean over
/// threads of each thread's own nanoseconds per operation.
pub fn concurrent_for<F: Fn() + Sync>(threads: usize, dur: Duration, op: F) -> f64 {
    const BATCH: u64 = 256;
    let stop = AtomicBool::new(false);
    let start = Barrier::new(threads + 1);
    let per_thread: Vec<f64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    let t0 = Instant::now();
                    let mut ops = 0u64;
                    while !stop.load(Relaxed) {
                        for _ in 0..BATCH {
                            op();
                        }
                        ops += BATCH;
                    }
                    t0.elapsed().as_nanos() as f64 / ops.max(1) as f64
                })
            })
            .collect();
        start.wait();
        std::thread::sleep(dur);
        stop.store(true, Relaxed);
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    per_thread.iter().sum::<f64>() / per_thread.len() as f64
}

/// Runs `iters` calls of `op` in each of `threads` threads at once and
/// returns the mean per-thread elapsed time (criterion's `iter_custom`:
/// divided by `iters` it is the per-thread cost).
pub fn concurrent_fixed<F: Fn() + Sync>(threads: usize, iters: u64, op: F) -> Duration {
    let start = Barrier::new(threads);
    let total: Duration = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        op();
                    }
                    t0.elapsed()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    total / threads as u32
}

/// Runs `body` on the calling thread while `threads` background threads
/// call `op` in a loop; returns `body`'s result and how many times the
/// background threads ran `op` during it. The background threads are
/// running (past a barrier) before `body` starts.
pub fn with_background<R, F: Fn() + Sync>(
    threads: usize,
    op: F,
    body: impl FnOnce() -> R,
) -> (R, u64) {
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let start = Barrier::new(threads + 1);
    let r = std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                start.wait();
                let mut n = 0u64;
                while !stop.load(Relaxed) {
                    op();
                    n += 1;
                }
                done.fetch_add(n, Relaxed);
            });
        }
        start.wait();
        let r = body();
        stop.store(true, Relaxed);
        r
    });
    (r, done.load(Relaxed))
}

/// Times one call of `f` in nanoseconds.
#[inline(never)]
pub fn time_ns(f: impl FnOnce()) -> f64 {
    let t0 = Instant::now();
    f();
    black_box(t0.elapsed().as_nanos() as f64)
}

/// Summary of repeated measurements.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Every sample, in nanoseconds.
    pub samples: Vec<f64>,
}

impl Stats {
    /// Collects `reps` samples from `f`.
    pub fn collect(reps: usize, mut f: impl FnMut() -> f64) -> Self {
        Stats {
            samples: (0..reps).map(|_| f()).collect(),
        }
    }

    /// Median of the samples (NaN if none).
    pub fn median(&self) -> f64 {
        let mut v = self.samples.clone();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    /// Smallest and largest sample.
    pub fn min_max(&self) -> (f64, f64) {
        self.samples
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            })
    }

    /// Number of samples.
    pub fn reps(&self) -> usize {
        self.samples.len()
    }
}

/// The time-stamp counter and its rate, for timing short spans inside a
/// hot loop (the dispatch part of a VM exit) without a clock_gettime pair.
#[cfg(target_arch = "x86_64")]
pub mod tsc {
    use std::time::{Duration, Instant};

    /// Reads the TSC.
    #[inline(always)]
    pub fn now() -> u64 {
        // SAFETY: `rdtsc` has no preconditions on x86_64 and touches no memory.
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    /// TSC ticks per nanosecond, calibrated against `Instant` over `dur`.
    pub fn ticks_per_ns(dur: Duration) -> f64 {
        let (t0, c0) = (Instant::now(), now());
        while t0.elapsed() < dur {
            std::hint::spin_loop();
        }
        let (t1, c1) = (Instant::now(), now());
        (c1 - c0) as f64 / (t1 - t0).as_nanos() as f64
    }
}
