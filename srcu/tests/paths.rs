//! Read sections on both counter paths (rseq and atomic), in every way a
//! section can begin and end: on one thread, handed to another thread and
//! back (`into_sendable` / `adopt`), dropped unadopted, interleaved with
//! sections of a domain on the other path, and begun or ended inside
//! thread-local destructors. Since the end of a section runs its rseq
//! sequence on both paths (an atomic-path section with its thread's
//! stand-in area, whose `cpu_id` sends the sequence to the fallback),
//! these check that every section is counted once and only on its own
//! path: the counters balance and no reader is left.
#![cfg(all(unix, not(loom)))]

mod common;

use srcu::{Classic, Fast, Flavor, Srcu};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::OnceLock;

/// `threads` readers, each making `iters` sections ended three ways (on
/// its thread; adopted by a new thread; dropped unadopted), while one
/// thread runs grace periods until every reader is done.
fn sections_three_ways<F: Flavor>(srcu: &Srcu<F>, threads: usize, iters: usize) {
    let done = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (srcu, done) = (&srcu, &done);
            s.spawn(move || {
                for i in 0..iters {
                    let g = srcu.read_lock();
                    match (i + t) % 7 {
                        0 => {
                            let sendable = g.into_sendable();
                            std::thread::scope(|s2| {
                                s2.spawn(move || drop(sendable.adopt()));
                            });
                        }
                        1 | 4 => drop(g.into_sendable()),
                        _ => drop(g),
                    }
                }
                done.fetch_add(1, SeqCst);
            });
        }
        let done = &done;
        s.spawn(move || {
            while done.load(SeqCst) < threads {
                srcu.synchronize();
            }
        });
    });
    assert_eq!(srcu.readers(), 0);
    assert!(srcu::__private::balanced(srcu));
}

#[test]
fn both_paths_balance_with_sections_that_change_threads() {
    let atomic_fast: Srcu<Fast> = Srcu::builder().force_atomic_counters(true).build();
    let atomic_classic: Srcu<Classic> = Srcu::builder().force_atomic_counters(true).build();
    let fast: Srcu<Fast> = Srcu::builder().build();
    let classic: Srcu<Classic> = Srcu::builder().build();
    // One per-CPU slot: threads on the other CPUs take the fallback.
    let one_slot: Srcu<Fast> = Srcu::builder().cpu_slots(1).build();
    sections_three_ways(&atomic_fast, 2, 20_000);
    sections_three_ways(&atomic_classic, 2, 20_000);
    sections_three_ways(&fast, 2, 20_000);
    sections_three_ways(&classic, 2, 20_000);
    sections_three_ways(&one_slot, 2, 20_000);
}

#[test]
fn sections_of_both_paths_interleaved_on_one_thread() {
    let atomic: Srcu<Fast> = Srcu::builder().force_atomic_counters(true).build();
    let rseq: Srcu<Fast> = Srcu::builder().build();
    for _ in 0..10_000 {
        let g1 = atomic.read_lock();
        let g2 = rseq.read_lock();
        let g3 = atomic.read_lock();
        drop(g1);
        drop(g2);
        drop(g3);
    }
    atomic.synchronize();
    rseq.synchronize();
    assert_eq!(atomic.readers(), 0);
    assert_eq!(rseq.readers(), 0);
    assert!(srcu::__private::balanced(&atomic));
    assert!(srcu::__private::balanced(&rseq));
}

fn atomic_domain() -> &'static Srcu<Fast> {
    static D: OnceLock<Srcu<Fast>> = OnceLock::new();
    D.get_or_init(|| Srcu::builder().force_atomic_counters(true).build())
}

fn rseq_domain() -> &'static Srcu<Classic> {
    static D: OnceLock<Srcu<Classic>> = OnceLock::new();
    D.get_or_init(|| Srcu::builder().build())
}

/// Holds a section begun on its thread; its destructor (a thread-local
/// one) ends it and makes two more sections, one per path.
struct InDestructor(Option<srcu::ReadGuard<'static, Fast>>);

impl Drop for InDestructor {
    fn drop(&mut self) {
        self.0.take();
        drop(atomic_domain().read_lock());
        drop(rseq_domain().read_lock());
    }
}

thread_local! {
    static HELD: std::cell::RefCell<Option<InDestructor>> = const { std::cell::RefCell::new(None) };
}

#[test]
fn sections_in_thread_local_destructors() {
    for _ in 0..50 {
        std::thread::spawn(|| {
            HELD.with(|h| *h.borrow_mut() = Some(InDestructor(Some(atomic_domain().read_lock()))));
        })
        .join()
        .unwrap();
    }
    atomic_domain().synchronize();
    rseq_domain().synchronize();
    assert_eq!(atomic_domain().readers(), 0);
    assert_eq!(rseq_domain().readers(), 0);
}

/// The benchmark's reference section without tracking
/// (`__private::untracked_section`) counts like a real one on every path:
/// each one begins exactly one section and ends it (balanced, nothing left
/// for a grace period to wait for), inside a real section too, and leaves
/// the thread's tracking alone. The fast domain is in its fallback mode
/// (no membarrier) in the child that `untracked_sections_without_membarrier`
/// runs.
#[test]
fn untracked_sections_balance_and_leave_tracking_alone() {
    fn check<F: Flavor>(srcu: &Srcu<F>) {
        const N: usize = 10_000;
        let begun = srcu::__private::sections_begun(srcu);
        for _ in 0..N {
            srcu::__private::untracked_section(srcu);
        }
        assert_eq!(srcu::__private::sections_begun(srcu).wrapping_sub(begun), N);
        assert_eq!(srcu.readers(), 0);
        assert!(!srcu.in_read_section());
        let g = srcu.read_lock();
        srcu::__private::untracked_section(srcu);
        assert!(srcu.in_read_section());
        assert_eq!(srcu.readers(), 1);
        drop(g);
        assert!(!srcu.in_read_section());
        assert_eq!(
            srcu::__private::sections_begun(srcu).wrapping_sub(begun),
            N + 2
        );
        srcu.synchronize();
        assert_eq!(srcu.readers(), 0);
    }
    let fast = Srcu::<Fast>::builder().build();
    let fallback = std::env::var_os("SRCU_NO_MEMBARRIER").is_some();
    assert_eq!(
        fast.reader_mode() == srcu::ReaderMode::FullBarrier,
        fallback,
        "the fast domain's mode follows SRCU_NO_MEMBARRIER"
    );
    check(&fast);
    check(&Srcu::<Classic>::builder().build());
    check(&Srcu::<Fast>::builder().force_atomic_counters(true).build());
    check(
        &Srcu::<Classic>::builder()
            .force_atomic_counters(true)
            .build(),
    );
    check(&Srcu::<Fast>::builder().cpu_slots(1).build());
    if fallback {
        println!("untracked sections checked in FullBarrier mode");
    }
}

/// The test above again in a child process of this test binary with
/// `SRCU_NO_MEMBARRIER=1`, where a fast domain ends each section by
/// retrying its sequence out of line.
#[test]
fn untracked_sections_without_membarrier() {
    common::rerun_without_membarrier(
        &["untracked_sections_balance_and_leave_tracking_alone"],
        &["untracked sections checked in FullBarrier mode"],
    );
}
