//! `call_srcu` and `barrier`: deferred work after a grace period.
//!
//! Callbacks go into one queue per domain. A worker thread, started by the
//! first `call_srcu` or `start_poll`, takes the whole queue as one batch,
//! waits for one grace period that started after it took the batch (so the
//! grace period covers every callback in it), and runs the batch in order.
//! Callbacks queued meanwhile form the next batch, so under a steady stream
//! one grace period retires everything queued during the previous one.
//!
//! `call_srcu` never waits for a grace period: it takes the queue mutex
//! (held only for a push or a swap), and wakes the worker only if it is
//! idle; after a batch the worker naps (`NAP`) and collects what arrives
//! meanwhile without being woken.
//! The worker also drives grace periods requested through `start_poll`.
//!
//! When the domain's handle is dropped, the worker drains the queue (one
//! more grace period) and exits; afterwards no reader can exist (guards
//! borrow the handle), so any late `call_srcu` (a stale value dropped after
//! its domain) runs its callback at once.

use crate::domain::{Inner, Srcu};
use crate::flavor::Flavor;
use crate::sync::{Arc, Condvar, JoinHandle, Mutex};

type Callback = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    queue: Vec<Callback>,
    /// Callbacks ever queued / ever run; `barrier` waits for `done` to
    /// reach the `queued` it saw.
    queued: u64,
    done: u64,
    worker_started: bool,
    /// The worker sleeps without a timeout: producers must wake it.
    worker_idle: bool,
    /// The worker naps after a batch (`NAP`): producers need not wake it,
    /// which keeps the futex wake-up off `call_srcu` under a steady stream.
    worker_napping: bool,
    /// A `barrier` caller waits: do not nap.
    hurry: u32,
    shutdown: bool,
}

/// How long the worker keeps collecting callbacks after a batch before it
/// goes to sleep for good (like the jiffies of delay Linux gives
/// non-expedited SRCU callbacks). Frees are delayed by at most this much; in
/// exchange `call_srcu` wakes the worker once per quiet spell, not once per
/// call. A wake-up is a futex call plus, when the worker's CPU is busy
/// running a vCPU, a reschedule IPI: in the demo VM this took `register_dev`
/// from 7.5 µs to 150 ns (median) with one device plugged every ~1.5 ms.
/// `barrier`, `start_poll` and dropping the domain cut the nap short.
#[cfg(not(loom))]
const NAP: std::time::Duration = std::time::Duration::from_millis(5);

pub(crate) struct Callbacks {
    state: Mutex<State>,
    /// The worker waits here for work.
    work: Condvar,
    /// `barrier` callers wait here for `done`.
    done: Condvar,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Callbacks {
    pub(crate) fn new() -> Self {
        Callbacks {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            done: Condvar::new(),
            worker: Mutex::new(None),
        }
    }

    /// Stops the worker after it has run everything queued. Called by the
    /// handle's `Drop`.
    pub(crate) fn shutdown(&self, _inner: &Inner) {
        let mut st = self.state.lock();
        st.shutdown = true;
        self.work.notify_all();
        drop(st);
        let handle = self.worker.lock().take();
        if let Some(h) = handle {
            #[cfg(not(loom))]
            if h.thread().id() == std::thread::current().id() {
                // The last handle was dropped by a callback: the worker
                // drains the queue and exits by itself.
                return;
            }
            let _ = h.join();
        }
    }
}

/// Makes sure the worker runs: starts it, or wakes it if it sleeps.
pub(crate) fn kick(inner: &Arc<Inner>) {
    let mut st = inner.cbs.state.lock();
    if st.worker_napping {
        inner.cbs.work.notify_all();
    }
    wake_locked(inner, &mut st);
}

fn wake_locked(inner: &Arc<Inner>, st: &mut State) {
    if st.shutdown {
        return;
    }
    if !st.worker_started {
        st.worker_started = true;
        let inner2 = inner.clone();
        let handle = crate::sync::spawn(move || worker(inner2));
        *inner.cbs.worker.lock() = Some(handle);
    } else if st.worker_idle || (st.worker_napping && st.hurry > 0) {
        inner.cbs.work.notify_all();
    }
}

fn worker(inner: Arc<Inner>) {
    let cbs = &inner.cbs;
    let mut just_ran = false;
    loop {
        let mut st = cbs.state.lock();
        let batch = loop {
            if !st.queue.is_empty() {
                break core::mem::take(&mut st.queue);
            }
            if inner.gp.needs_driver() {
                break Vec::new();
            }
            if st.shutdown {
                return;
            }
            #[cfg(not(loom))]
            if just_ran && st.hurry == 0 {
                just_ran = false;
                st.worker_napping = true;
                let _ = cbs.work.wait_for(&mut st, NAP);
                st.worker_napping = false;
                continue;
            }
            let _ = just_ran;
            st.worker_idle = true;
            cbs.work.wait(&mut st);
            st.worker_idle = false;
        };
        drop(st);
        if batch.is_empty() {
            // A polled grace period nobody drives.
            inner.wait_for_gp(inner.gp.requested());
            continue;
        }
        // The grace period starts after the batch was taken, so it waits
        // for every reader that could see what the callbacks free.
        inner.synchronize_inner();
        let n = batch.len() as u64;
        for cb in batch {
            run(cb);
        }
        let mut st = cbs.state.lock();
        st.done += n;
        cbs.done.notify_all();
        just_ran = true;
    }
}

fn run(cb: Callback) {
    #[cfg(not(loom))]
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(cb)).is_err() {
        eprintln!("srcu: a call_srcu callback panicked; the remaining callbacks still run");
    }
    #[cfg(loom)]
    cb();
}

impl<F: Flavor> Srcu<F> {
    /// Queues `f` to run after a grace period: after every read section that
    /// began before this call has ended. Never waits for the grace period.
    ///
    /// Callbacks run in order on the domain's worker thread; one grace
    /// period retires every callback queued before it began. A callback
    /// that panics is reported on stderr and the others still run.
    ///
    /// ```
    /// use std::sync::{Arc, atomic::{AtomicBool, Ordering}};
    /// let srcu = srcu::Srcu::new();
    /// let ran = Arc::new(AtomicBool::new(false));
    /// let r = ran.clone();
    /// srcu.call_srcu(move || r.store(true, Ordering::SeqCst));
    /// srcu.barrier();
    /// assert!(ran.load(Ordering::SeqCst));
    /// ```
    pub fn call_srcu(&self, f: impl FnOnce() + Send + 'static) {
        call_srcu_inner(&self.inner, Box::new(f));
    }

    /// Waits until every callback queued (by any thread) before this call
    /// has run.
    ///
    /// # Panics
    ///
    /// In debug builds, if the calling thread holds a read section of this
    /// domain (the callbacks wait for a grace period that waits for it).
    pub fn barrier(&self) {
        crate::held::assert_not_reading(self.inner.id(), "barrier");
        let cbs = &self.inner.cbs;
        let mut st = cbs.state.lock();
        let target = st.queued;
        if st.done >= target {
            return;
        }
        st.hurry += 1;
        if st.worker_napping {
            cbs.work.notify_all();
        }
        while st.done < target {
            cbs.done.wait(&mut st);
        }
        st.hurry -= 1;
    }

    /// Callbacks queued but not yet run.
    pub fn pending_callbacks(&self) -> u64 {
        let st = self.inner.cbs.state.lock();
        st.queued - st.done
    }
}

pub(crate) fn call_srcu_inner(inner: &Arc<Inner>, f: Callback) {
    let mut st = inner.cbs.state.lock();
    if st.shutdown {
        // The handle is gone, so no read section can exist.
        drop(st);
        run(f);
        return;
    }
    st.queue.push(f);
    st.queued += 1;
    wake_locked(inner, &mut st);
}
