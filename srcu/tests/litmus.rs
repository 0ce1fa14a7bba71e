//! Store-buffering litmus tests on real hardware: the pattern that barriers
//! A and B (classic) or A-as-membarrier (fast) exist to forbid.
//!
//! ```text
//!   reader                      updater
//!   read_lock()  (lock[i] += 1) Y = n
//!   B                           drain check of i: Σunlock, A, Σlock
//!   r = Y
//!   forbidden: the check finds index i drained AND r != n
//! ```
//!
//! If the updater's check misses the reader's lock increment, the reader
//! must see the store to Y that came before the check (so a real grace
//! period would never free what the reader can reach). x86 reorders a store
//! with a later load through its store buffer, so removing either barrier
//! makes the forbidden outcome show up within thousands of iterations; see
//! `scripts/teeth.sh`. With the barriers in place it must never appear.
#![cfg(not(loom))]

use srcu::{Classic, Fast, Flavor, Srcu};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};

/// Iterations per configuration (`SRCU_LITMUS_ITERS` overrides). The fast
/// flavor issues a membarrier per check, so it gets half.
fn iters(fast: bool) -> u64 {
    let n = std::env::var("SRCU_LITMUS_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    if fast {
        n / 2
    } else {
        n
    }
}

/// Runs the litmus test; returns the number of forbidden outcomes.
fn store_buffering<F: Flavor>(srcu: &Srcu<F>, iters: u64) -> u64 {
    let y = AtomicU64::new(0);
    // Per-iteration two-sided rendezvous (spinning), so both threads enter
    // the racy window together; then a small varying delay on each side
    // slides the two windows over each other.
    let ready_r = AtomicU64::new(0);
    let ready_u = AtomicU64::new(0);
    let reader_done = AtomicU64::new(0);
    let updater_done = AtomicU64::new(0);
    let reader_saw = AtomicU64::new(0);
    let forbidden = AtomicUsize::new(0);
    let idx = srcu::__private::current_index(srcu);
    let delay = |k: u64| {
        for _ in 0..k {
            std::hint::spin_loop();
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            for n in 1..=iters {
                ready_r.store(n, Release);
                while ready_u.load(Acquire) < n {
                    std::hint::spin_loop();
                }
                delay(n % 7);
                let g = srcu.read_lock();
                let r = y.load(Relaxed);
                reader_saw.store(r, Relaxed);
                reader_done.store(n, Release);
                // Keep the section open until the updater has checked.
                while updater_done.load(Acquire) < n {
                    std::hint::spin_loop();
                }
                drop(g);
            }
        });
        for n in 1..=iters {
            ready_u.store(n, Release);
            while ready_r.load(Acquire) < n {
                std::hint::spin_loop();
            }
            delay((n / 7) % 5);
            y.store(n, Relaxed);
            let drained = srcu::__private::drained(srcu, idx);
            while reader_done.load(Acquire) < n {
                std::hint::spin_loop();
            }
            if drained && reader_saw.load(Relaxed) != n {
                forbidden.fetch_add(1, Relaxed);
            }
            updater_done.store(n, Release);
        }
    });
    forbidden.load(Relaxed) as u64
}

fn run<F: Flavor>(name: &str, srcu: Srcu<F>) {
    let n = iters(F::FAST);
    let t = std::time::Instant::now();
    let bad = store_buffering(&srcu, n);
    println!(
        "litmus {name} ({:?}, {:?}): {n} iterations in {:.2} s, {bad} forbidden outcomes",
        srcu.reader_mode(),
        srcu.counter_path(),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        bad, 0,
        "{name}: the drain check missed a reader that then missed the updater's store"
    );
}

// One test runs all four configurations in turn: they need both cores.
#[test]
fn store_buffering_is_forbidden() {
    run("classic", Srcu::<Classic>::builder().build());
    run(
        "classic-atomic",
        Srcu::<Classic>::builder()
            .force_atomic_counters(true)
            .build(),
    );
    run("fast", Srcu::<Fast>::builder().build());
    run(
        "fast-atomic",
        Srcu::<Fast>::builder().force_atomic_counters(true).build(),
    );
}
