//! Section 2: grace periods (`synchronize` idle, under read load, with a
//! long section; `synchronize_expedited`; `call_srcu` throughput and batch
//! size), for both flavors.

use crate::harness::{time_ns, with_background, Stats};
use srcu::{Flavor, Srcu};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// A fresh domain of flavor `F` with its callback worker already started
/// (so no measurement pays for the thread spawn).
pub fn domain<F: Flavor>() -> Srcu<F> {
    let s = Srcu::<F>::builder().build();
    s.call_srcu(|| {});
    s.barrier();
    s
}

/// Median ns of `reps` idle `synchronize` calls (no reader anywhere).
pub fn synchronize_idle<F: Flavor>(srcu: &Srcu<F>, reps: usize) -> Stats {
    srcu.synchronize();
    Stats::collect(reps, || time_ns(|| srcu.synchronize()))
}

/// Median ns of `reps` idle `synchronize_expedited` calls.
pub fn synchronize_expedited_idle<F: Flavor>(srcu: &Srcu<F>, reps: usize) -> Stats {
    srcu.synchronize_expedited();
    Stats::collect(reps, || time_ns(|| srcu.synchronize_expedited()))
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
