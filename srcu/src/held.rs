//! Debug-build bookkeeping of which domains the current thread is reading,
//! so that `synchronize` or `barrier` from inside a read section of the same
//! domain panics with a clear message instead of hanging forever.
//!
//! Release builds compile all of this to nothing: there a self-deadlock
//! hangs, and the stall hook reports it after the stall timeout (10 s by
//! default). The debug cost is a thread-local lookup and an `Arc` clone per
//! `read_lock`.
//!
//! A guard moved to another thread stays counted against the thread that
//! created it until it is dropped, so in debug builds that thread must not
//! call `synchronize` on the same domain meanwhile (it panics rather than
//! guessing).

#[cfg(all(debug_assertions, not(loom)))]
mod imp {
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::sync::Arc;

    thread_local! {
        static HELD: RefCell<Vec<(usize, Arc<AtomicUsize>)>> = const { RefCell::new(Vec::new()) };
    }

    fn counter(domain: usize) -> Arc<AtomicUsize> {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            h.retain(|(_, c)| Arc::strong_count(c) > 1 || c.load(Relaxed) > 0);
            if let Some((_, c)) = h.iter().find(|(d, _)| *d == domain) {
                return c.clone();
            }
            let c = Arc::new(AtomicUsize::new(0));
            h.push((domain, c.clone()));
            c
        })
    }

    pub(crate) struct Held(Arc<AtomicUsize>);

    impl Held {
        pub(crate) fn enter(domain: usize) -> Self {
            let c = counter(domain);
            c.fetch_add(1, Relaxed);
            Held(c)
        }
        pub(crate) fn leave(&self) {
            self.0.fetch_sub(1, Relaxed);
        }
    }

    pub(crate) fn assert_not_reading(domain: usize, what: &str) {
        let depth = HELD
            .try_with(|h| {
                h.borrow()
                    .iter()
                    .find(|(d, _)| *d == domain)
                    .map_or(0, |(_, c)| c.load(Relaxed))
            })
            .unwrap_or(0);
        assert!(
            depth == 0,
            "srcu: {what}() called inside a read section of the same domain on this thread \
             ({depth} section(s) open); it would wait for itself forever"
        );
    }
}

#[cfg(not(all(debug_assertions, not(loom))))]
mod imp {
    pub(crate) struct Held;
    impl Held {
        #[inline(always)]
        pub(crate) fn enter(_domain: usize) -> Self {
            Held
        }
        #[inline(always)]
        pub(crate) fn leave(&self) {}
    }
    #[inline(always)]
    pub(crate) fn assert_not_reading(_domain: usize, _what: &str) {}
}

pub(crate) use imp::{assert_not_reading, Held};
