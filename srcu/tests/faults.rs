//! Faults and misuse: a panic anywhere leaves the domain working with
//! nothing queued lost; waiting for readers costs bounded `membarrier`
//! calls and CPU (asserted through the domain's statistics, not timings);
//! every caller returns within a bounded number of grace periods; the
//! self-deadlock check is exact.
#![cfg(not(loom))]

use srcu::{Classic, Fast, Flavor, ReaderMode, Srcu, SrcuCell, UpdateLock};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn panic_message(err: &(dyn std::any::Any + Send)) -> String {
    err.downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// A domain whose stall hook panics once (when armed), after 5 ms.
fn domain_with_panicking_hook<F: Flavor>(armed: Arc<AtomicBool>) -> Srcu<F> {
    Srcu::<F>::builder()
        .stall_timeout(Duration::from_millis(5))
        .on_stall(move |r| {
            if armed.swap(false, SeqCst) {
                panic!("injected stall-hook panic: {r}");
            }
        })
        .build()
}

/// Runs `f` while another thread holds a read section of `srcu`; the
/// section ends when `f` returns.
fn with_reader<F: Flavor, R>(srcu: &Srcu<F>, f: impl FnOnce() -> R) -> R {
    let (entered_tx, entered_rx) = mpsc::channel();
    let (leave_tx, leave_rx) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(move || {
            let g = srcu.read_lock();
            entered_tx.send(()).unwrap();
            let _ = leave_rx.recv();
            drop(g);
        });
        entered_rx.recv().unwrap();
        let r = f();
        leave_tx.send(()).unwrap();
        r
    })
}

fn stall_hook_panic_restores_state<F: Flavor>() {
    let armed = Arc::new(AtomicBool::new(true));
    let srcu = domain_with_panicking_hook::<F>(armed.clone());
    let err = with_reader(&srcu, || {
        catch_unwind(AssertUnwindSafe(|| srcu.synchronize())).unwrap_err()
    });
    assert!(err
        .downcast_ref::<String>()
        .unwrap()
        .contains("injected stall-hook panic"));
    assert!(!armed.load(SeqCst));
    let st = srcu.stats();
    assert_eq!(st.driver_panics, 1);
    assert_eq!(srcu::__private::waiters(&srcu), (0, false), "nobody drives");
    // No reader now: every kind of grace period completes.
    let before = srcu.completed_grace_periods();
    srcu.synchronize();
    srcu.synchronize_expedited();
    let cookie = srcu.start_poll();
    while !srcu.poll(cookie) {
        std::thread::yield_now();
    }
    let lock = UpdateLock::new(());
    let cell = SrcuCell::new(&srcu, &lock, Some(7));
    let old = cell.assign(8, &mut lock.lock()).unwrap().synchronize();
    assert_eq!(*old, 7);
    assert!(srcu.completed_grace_periods() >= before + 3);
    assert_eq!(srcu.stats().driver_panics, 1);
}

#[test]
fn stall_hook_panic_restores_state_classic() {
    stall_hook_panic_restores_state::<Classic>();
}

#[test]
fn stall_hook_panic_restores_state_fast() {
    stall_hook_panic_restores_state::<Fast>();
}

/// The callback worker drives the grace period whose stall hook panics:
/// it survives, the batch is retried, `barrier` returns, each callback runs
/// exactly once, and the domain's drop runs the ones queued after.
fn worker_survives_panicking_grace_period<F: Flavor>() {
    let armed = Arc::new(AtomicBool::new(true));
    let srcu = domain_with_panicking_hook::<F>(armed.clone());
    let runs = Arc::new(AtomicUsize::new(0));
    with_reader(&srcu, || {
        for _ in 0..10 {
            let r = runs.clone();
            srcu.call_srcu(move || {
                r.fetch_add(1, SeqCst);
            });
        }
        // The worker's grace period waits for the reader and stalls.
        while armed.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(1)); // polling a flag, not ordering
        }
        assert_eq!(runs.load(SeqCst), 0, "ran before the reader left");
    });
    srcu.barrier();
    assert_eq!(runs.load(SeqCst), 10);
    let st = srcu.stats();
    assert_eq!(st.driver_panics, 1);
    assert_eq!(st.worker_starts, 1, "the worker survived");
    assert_eq!(st.callbacks_run, 10);
    // Later callbacks still run, and drop runs what is left, once each.
    for _ in 0..5 {
        let r = runs.clone();
        srcu.call_srcu(move || {
            r.fetch_add(1, SeqCst);
        });
    }
    drop(srcu);
    assert_eq!(runs.load(SeqCst), 15);
}

#[test]
fn worker_survives_panicking_grace_period_classic() {
    worker_survives_panicking_grace_period::<Classic>();
}

#[test]
fn worker_survives_panicking_grace_period_fast() {
    worker_survives_panicking_grace_period::<Fast>();
}

#[test]
fn barrier_inside_callback_panics_clearly_and_worker_goes_on() {
    let srcu = Arc::new(Srcu::new());
    let msg = Arc::new(std::sync::Mutex::new(String::new()));
    let (s2, m2) = (srcu.clone(), msg.clone());
    srcu.call_srcu(move || {
        let err = catch_unwind(AssertUnwindSafe(|| s2.barrier())).unwrap_err();
        *m2.lock().unwrap() = panic_message(&*err);
    });
    srcu.barrier();
    assert!(
        msg.lock()
            .unwrap()
            .contains("barrier() called from a call_srcu callback"),
        "{}",
        msg.lock().unwrap()
    );
    // Uncaught inside the callback: counted as a callback panic; the
    // worker goes on.
    let s3 = srcu.clone();
    srcu.call_srcu(move || s3.barrier());
    srcu.barrier();
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    srcu.call_srcu(move || r.store(true, SeqCst));
    srcu.barrier();
    assert!(ran.load(SeqCst));
    assert_eq!(srcu.stats().callback_panics, 1);
}

/// A stale value whose drop panics (the deferred drop runs it on the
/// worker, in the value's own box): counted as a callback panic; the
/// values queued with it and after it are still dropped, each once, and
/// the domain goes on.
#[test]
fn panicking_drop_of_a_stale_value_loses_nothing() {
    struct Drops<'a>(&'a AtomicUsize, bool);
    impl Drop for Drops<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, SeqCst);
            if self.1 {
                panic!("injected panic in a deferred drop");
            }
        }
    }
    static DROPPED: AtomicUsize = AtomicUsize::new(0);
    let srcu = Srcu::new();
    let lock = UpdateLock::new(());
    let cell = SrcuCell::new(&srcu, &lock, Some(Drops(&DROPPED, false)));
    {
        let mut guard = lock.lock();
        for i in 0..5 {
            // The value assigned at i == 1 panics when dropped (after i == 2
            // replaces it).
            drop(cell.assign(Drops(&DROPPED, i == 1), &mut guard));
        }
    }
    srcu.barrier();
    assert_eq!(DROPPED.load(SeqCst), 5, "every replaced value dropped once");
    assert_eq!(srcu.stats().callback_panics, 1);
    drop(cell.take(&mut lock.lock()));
    srcu.barrier();
    assert_eq!(DROPPED.load(SeqCst), 6);
    assert_eq!(srcu.stats().callback_panics, 1);
}

/// `membarrier` fails after registration (as under a seccomp filter): the
/// fallback barrier keeps grace periods correct and the domain working.
#[test]
fn membarrier_failure_falls_back_and_still_waits_for_readers() {
    let srcu = Srcu::new_fast();
    if srcu.reader_mode() != ReaderMode::Membarrier {
        eprintln!("membarrier unavailable: the fallback is not reachable here");
        return;
    }
    let lock = UpdateLock::new(());
    let cell = SrcuCell::new(&srcu, &lock, Some(AtomicU64::new(1)));
    srcu::__private::inject_membarrier_failures(1_000);
    let (entered_tx, entered_rx) = mpsc::channel();
    let left = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let g = srcu.read_lock();
            let v = cell.dereference(&g).unwrap();
            entered_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(30));
            assert_eq!(v.load(SeqCst), 1);
            left.store(true, SeqCst);
            drop(g);
        });
        entered_rx.recv().unwrap();
        let old = cell.assign(AtomicU64::new(2), &mut lock.lock()).unwrap();
        let old = old.synchronize();
        assert!(
            left.load(SeqCst),
            "the grace period did not wait for the reader"
        );
        old.store(0, SeqCst);
    });
    srcu::__private::inject_membarrier_failures(0);
    let st = srcu.stats();
    assert!(st.membarrier_fallbacks >= 3, "{st:?}");
    assert_eq!(st.membarrier_fallbacks, st.membarriers);
    srcu.synchronize();
    assert_eq!(srcu.stats().membarrier_fallbacks, st.membarrier_fallbacks);
}

/// An idle grace period costs 3 `membarrier` calls in a fast domain (A of
/// each scan and D; E rides on A), none in a classic one.
#[test]
fn idle_grace_period_membarrier_count() {
    let fast = Srcu::new_fast();
    let classic = Srcu::new();
    for _ in 0..3 {
        let b = fast.stats();
        fast.synchronize();
        let d = fast.stats().since(&b);
        assert_eq!(d.grace_periods, 1);
        let want = if fast.reader_mode() == ReaderMode::Membarrier {
            3
        } else {
            0
        };
        assert_eq!(d.membarriers, want, "{d:?}");
        assert_eq!(d.scans, 2);
        let b = fast.stats();
        fast.synchronize_expedited();
        assert_eq!(fast.stats().since(&b).membarriers, want);
        let b = classic.stats();
        classic.synchronize();
        assert_eq!(classic.stats().since(&b).membarriers, 0);
    }
}

/// One reader holds a section for 200 ms: the grace period waiting for it
/// issues a bounded number of `membarrier` calls (not one per poll) and
/// burns at most 5% of a CPU beyond its first 100 µs, expedited included.
fn long_reader_costs_bounded<F: Flavor>(expedited: bool) {
    let srcu = Srcu::<F>::builder().build();
    let (entered_tx, entered_rx) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let g = srcu.read_lock();
            entered_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(200)); // the section's length
            drop(g);
        });
        entered_rx.recv().unwrap();
        let before = srcu.stats();
        if expedited {
            srcu.synchronize_expedited();
        } else {
            srcu.synchronize();
        }
        let d = srcu.stats().since(&before);
        println!(
            "{} {}: {} membarriers, wait {:.1} ms wall, {:.2} ms CPU, {} naps, {} stretches",
            F::NAME,
            if expedited { "expedited" } else { "normal" },
            d.membarriers,
            d.wait_wall_ns as f64 / 1e6,
            d.wait_cpu_ns as f64 / 1e6,
            d.wait_naps,
            d.wait_nap_stretches
        );
        assert!(d.wait_wall_ns >= 100_000_000, "{d:?}");
        assert!(d.membarriers <= 36, "membarrier storm: {d:?}");
        // Naps, not a poll loop: after the doubling from 20 µs (6 naps)
        // each lasts at least the smallest cap, 500 µs; a cap stretched
        // at most twice (by naps costing > 3 % of their length).
        let most_naps = 16 + d.wait_wall_ns / 500_000;
        assert!(
            (1..=most_naps).contains(&d.wait_naps),
            "{} naps, at most {most_naps}: {d:?}",
            d.wait_naps
        );
        assert!(d.wait_nap_stretches <= 2, "{d:?}");
        let budget = 100_000 + (d.wait_wall_ns - 100_000) / 20;
        assert!(
            d.wait_cpu_ns <= budget,
            "waiting burnt {} ns of CPU, budget {budget}: {d:?}",
            d.wait_cpu_ns
        );
    });
}

#[test]
fn long_reader_costs_bounded_fast() {
    long_reader_costs_bounded::<Fast>(false);
}

#[test]
fn long_reader_costs_bounded_fast_expedited() {
    long_reader_costs_bounded::<Fast>(true);
}

#[test]
fn long_reader_costs_bounded_classic_expedited() {
    long_reader_costs_bounded::<Classic>(true);
}

/// Two threads call `synchronize` back to back while readers churn; a third
/// caller waits for a reader of its own. Once that reader leaves, the third
/// caller returns within 20 ms: the driver role is handed over, nobody
/// keeps driving for everybody. The callback worker is not captured either.
fn bounded_latency<F: Flavor>() {
    let srcu = Srcu::<F>::builder().build();
    let stop = AtomicBool::new(false);
    let mut worst = Duration::ZERO;
    let mut worst_cb = Duration::ZERO;
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(SeqCst) {
                    srcu.synchronize();
                }
            });
        }
        s.spawn(|| {
            while !stop.load(SeqCst) {
                let g = srcu.read_lock();
                std::hint::black_box(&g);
                drop(g);
            }
        });
        for _ in 0..5 {
            let (entered_tx, entered_rx) = mpsc::channel();
            let (left_tx, left_rx) = mpsc::channel::<Instant>();
            let ran_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
            let srcu = &srcu;
            let reader = s.spawn(move || {
                let g = srcu.read_lock();
                entered_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(30));
                drop(g);
                left_tx.send(Instant::now()).unwrap();
            });
            entered_rx.recv().unwrap();
            let r = ran_at.clone();
            srcu.call_srcu(move || *r.lock().unwrap() = Some(Instant::now()));
            srcu.synchronize();
            let returned = Instant::now();
            let left = left_rx.recv().unwrap();
            reader.join().unwrap();
            worst = worst.max(returned.saturating_duration_since(left));
            let cb = loop {
                if let Some(t) = *ran_at.lock().unwrap() {
                    break t;
                }
                std::thread::yield_now();
            };
            worst_cb = worst_cb.max(cb.saturating_duration_since(left));
        }
        stop.store(true, SeqCst);
    });
    println!(
        "{}: third caller returned at worst {:?} after its reader left; callback {:?}; {} hand-overs",
        F::NAME,
        worst,
        worst_cb,
        srcu.stats().driver_handoffs
    );
    assert!(worst <= Duration::from_millis(20), "held for {worst:?}");
    assert!(
        worst_cb <= Duration::from_millis(50),
        "callback worker held for {worst_cb:?}"
    );
}

#[test]
fn bounded_latency_classic() {
    bounded_latency::<Classic>();
}

#[test]
fn bounded_latency_fast() {
    bounded_latency::<Fast>();
}

/// The self-deadlock check is exact: a section moved away does not count
/// against the thread that created it, and counts on the thread that
/// adopted it.
#[test]
fn self_deadlock_check_follows_moved_sections() {
    let srcu = Srcu::new();
    let g = srcu.read_lock();
    let moved = g.into_sendable();
    assert!(!srcu.in_read_section());
    std::thread::scope(|s| {
        s.spawn(|| {
            let g = moved.adopt();
            assert!(srcu.in_read_section());
            let err = catch_unwind(AssertUnwindSafe(|| srcu.synchronize())).unwrap_err();
            assert!(err
                .downcast_ref::<String>()
                .unwrap()
                .contains("inside a read section"));
            drop(g);
            assert!(!srcu.in_read_section());
        });
    });
    srcu.synchronize(); // the creating thread holds nothing: no panic
    let stale = {
        let lock = UpdateLock::new(());
        let cell = SrcuCell::new(&srcu, &lock, Some(1));
        let _g = srcu.read_lock();
        let old = cell.take(&mut lock.lock()).unwrap();
        let err = catch_unwind(AssertUnwindSafe(|| old.synchronize())).unwrap_err();
        err.downcast_ref::<String>().unwrap().clone()
    };
    assert!(stale.contains("Stale::synchronize"), "{stale}");
}

#[test]
fn read_lock_in_thread_local_destructor() {
    static DOMAIN: std::sync::OnceLock<Srcu> = std::sync::OnceLock::new();
    struct ReadsOnExit;
    impl Drop for ReadsOnExit {
        fn drop(&mut self) {
            let s = DOMAIN.get().unwrap();
            let g = s.read_lock();
            assert!(s.in_read_section());
            drop(g);
        }
    }
    thread_local!(static ON_EXIT: ReadsOnExit = const { ReadsOnExit });
    let s = DOMAIN.get_or_init(Srcu::new);
    std::thread::spawn(|| ON_EXIT.with(|_| ())).join().unwrap();
    assert_eq!(s.readers(), 0);
    s.synchronize();
}

/// A value retired into a domain whose handle is then dropped is complete
/// at once: no reader can exist, and polling must not spin forever.
#[test]
fn stale_of_a_dropped_domain_is_complete() {
    let srcu = Srcu::new();
    let old = srcu.retire(5u32);
    drop(srcu);
    assert!(old.is_complete());
    assert_eq!(*old.synchronize(), 5);
}

/// A guard leaked with `mem::forget` keeps its thread's count for the
/// domain's tracking slot up for good; a later domain must not inherit it.
/// (Slots are reused last-freed first, so without the fix `b` would get
/// `a`'s slot. Each round retires one of the 255 slots for good, so only a
/// few rounds: other tests of this binary need tracked domains.)
#[test]
fn leaked_guard_does_not_poison_later_domains() {
    for _ in 0..3 {
        let a = Srcu::new();
        std::mem::forget(a.read_lock());
        drop(a);
        let b = Srcu::new();
        assert!(!b.in_read_section());
        b.synchronize();
    }
}

/// A panic inside `UpdateGuard::unlocked` relocks the guard: the caller
/// that catches it still holds the lock, and dropping the guard releases it.
#[test]
fn panic_inside_unlocked_relocks() {
    let lock = UpdateLock::new(1u32);
    let mut g = lock.lock();
    let r = catch_unwind(AssertUnwindSafe(|| {
        g.unlocked(|| panic!("injected panic while unlocked"));
    }));
    assert!(r.is_err());
    // Deref succeeds only if the guard took the lock again (it holds a
    // mutex guard again; otherwise it would panic here).
    *g += 1;
    drop(g);
    assert_eq!(*lock.lock(), 2);
}
