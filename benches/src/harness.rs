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

/// CPU time consumed by the calling thread so far, in nanoseconds
/// (`CLOCK_THREAD_CPUTIME_ID`: excludes time the thread was descheduled,
/// which on a shared machine would otherwise land in random samples).
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a
    // constant supported on every Linux since 2.6.12.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Times `iters` calls of `op` on this thread and returns nanoseconds of
/// this thread's CPU time per call (a single-threaded figure: time the
/// thread spent descheduled by other tenants is not counted).
#[inline(never)]
pub fn ns_per_op(iters: u64, mut op: impl FnMut()) -> f64 {
    let start = thread_cpu_ns();
    for _ in 0..iters {
        op();
    }
    (thread_cpu_ns() - start) as f64 / iters.max(1) as f64
}

/// Result of [`concurrent_for`].
#[derive(Clone, Debug)]
pub struct Concurrent {
    /// Per-thread ns per operation, measured only over the windows in
    /// which *every* thread was on a CPU the whole time (so the threads
    /// really ran at the same time); NaN if there was no such window.
    pub ns_per_op: f64,
    /// Mean over threads of each thread's wall-clock ns per operation over
    /// the whole span (inflated when other tenants deschedule the threads).
    pub wall_ns_per_op: f64,
    /// Mean over threads of the fraction of the span the thread was on a
    /// CPU (1.0 = never descheduled).
    pub on_cpu: f64,
    /// Fraction of windows in which all threads ran throughout.
    pub concurrent_windows: f64,
    /// Per-thread ns per operation in each counted window (every thread
    /// on a CPU throughout); `ns_per_op` is their ops-weighted mean.
    pub window_ns: Vec<f64>,
}

/// Length of one window of [`concurrent_for`].
const WINDOW: Duration = Duration::from_micros(100);

/// One thread's record of one window: wall start and end (ns since the
/// common start), CPU time consumed, operations done.
#[derive(Clone, Copy)]
struct Win {
    start: u64,
    end: u64,
    cpu: u64,
    ops: u64,
}

/// Runs `op` in `threads` threads concurrently for `dur` (started together
/// behind a barrier, stopped together by a flag).
///
/// Each thread cuts its run into ~100 µs windows and records wall time,
/// its own CPU time (`CLOCK_THREAD_CPUTIME_ID`) and operations per window.
/// A window counts if its thread was on a CPU throughout (CPU time >= 97%
/// of wall time) *and* every other thread was on a CPU throughout every
/// window of its own that overlaps it: then all threads really ran at once
/// and the window's wall time divided by its operations is the per-thread
/// cost under concurrency. On a machine shared with other tenants this
/// discards the time slices in which one of the threads was descheduled
/// (which would make the figure meaningless: neither contention nor
/// per-thread cost). The reported figure is the ops-weighted mean over the
/// counting windows.
pub fn concurrent_for<F: Fn() + Sync>(threads: usize, dur: Duration, op: F) -> Concurrent {
    const BATCH: u64 = 64;
    let stop = AtomicBool::new(false);
    let start = Barrier::new(threads + 1);
    let epoch = Instant::now();
    let per_thread: Vec<(Vec<Win>, f64, f64)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut wins = Vec::with_capacity(4096);
                    start.wait();
                    let (t0, c0) = (Instant::now(), thread_cpu_ns());
                    let (mut ws, mut wc, mut wo) = (t0, c0, 0u64);
                    let mut ops = 0u64;
                    while !stop.load(Relaxed) {
                        for _ in 0..BATCH {
                            op();
                        }
                        ops += BATCH;
                        wo += BATCH;
                        let now = Instant::now();
                        if now - ws >= WINDOW {
                            let c = thread_cpu_ns();
                            wins.push(Win {
                                start: (ws - epoch).as_nanos() as u64,
                                end: (now - epoch).as_nanos() as u64,
                                cpu: c - wc,
                                ops: wo,
                            });
                            (ws, wc, wo) = (Instant::now(), thread_cpu_ns(), 0);
                        }
                    }
                    let wall = t0.elapsed().as_nanos() as f64;
                    let cpu = (thread_cpu_ns() - c0) as f64;
                    (wins, wall / ops.max(1) as f64, cpu / wall)
                })
            })
            .collect();
        start.wait();
        std::thread::sleep(dur);
        stop.store(true, Relaxed);
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let full = |w: &Win| w.cpu as f64 >= 0.97 * (w.end - w.start) as f64;
    let (mut wall_sum, mut ops_sum, mut counted, mut total) = (0u64, 0u64, 0usize, 0usize);
    let mut window_ns = Vec::new();
    for (i, (wins, _, _)) in per_thread.iter().enumerate() {
        for w in wins {
            total += 1;
            if !full(w) {
                continue;
            }
            let others_ran = per_thread.iter().enumerate().all(|(j, (other, _, _))| {
                j == i || {
                    // Windows of thread j overlapping [w.start, w.end]:
                    // all full, and together they cover it.
                    let first = other.partition_point(|o| o.end <= w.start);
                    let mut covered_to = w.start;
                    for o in &other[first..] {
                        if o.start >= w.end {
                            break;
                        }
                        // Gaps between j's windows are tiny (a clock read);
                        // treat a window that starts within 2 µs as adjacent.
                        if !full(o) || o.start > covered_to + 2_000 {
                            return false;
                        }
                        covered_to = covered_to.max(o.end);
                    }
                    covered_to >= w.end
                }
            });
            if others_ran {
                counted += 1;
                window_ns.push((w.end - w.start) as f64 / w.ops.max(1) as f64);
                wall_sum += w.end - w.start;
                ops_sum += w.ops;
            }
        }
    }
    let n = per_thread.len() as f64;
    Concurrent {
        ns_per_op: if ops_sum > 0 {
            wall_sum as f64 / ops_sum as f64
        } else {
            f64::NAN
        },
        wall_ns_per_op: per_thread.iter().map(|p| p.1).sum::<f64>() / n,
        on_cpu: per_thread.iter().map(|p| p.2).sum::<f64>() / n,
        concurrent_windows: counted as f64 / total.max(1) as f64,
        window_ns,
    }
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
