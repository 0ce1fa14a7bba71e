//! How long a grace-period driver naps between polls of readers that take
//! their time.
//!
//! Readers do not signal the updater (that would cost them), so a driver
//! polls. It spins for the first [`SPIN_FOR`] (sections are short), then
//! sleeps, doubling the nap from 20 µs up to a cap: 1 ms, or 500 µs while
//! an expedited grace period is wanted. The cap bounds how late a driver
//! notices that the last reader has left.
//!
//! A nap is not free. Besides the poll after it, the sleep itself costs
//! the sleeping thread CPU time: the system call, arming the timer, the
//! two context switches. How much depends on the host: about 15 µs per
//! nap on the Intel Xeon guests these figures come from, 30-40 µs on a
//! 2-vCPU AMD EPYC (Zen 5) Firecracker guest, whatever the nap's length
//! (measured with the thread CPU clock around `nanosleep`, 20 µs to 2 ms).
//! At 40 µs a nap, 1 ms naps burn 4-5 % of a CPU for as long as a reader
//! holds its section, 500 µs naps 8 %.
//!
//! So the driver measures what its naps at the cap cost (the thread CPU
//! clock around the sleep; one `clock_gettime` pair per nap at the cap,
//! nothing before) and, when one costs more than [`CPU_BUDGET_PERCENT`] of
//! its length, doubles that cap for the rest of the wait: the normal cap
//! up to [`MAX_STRETCH`] times (4 ms), the expedited one up to
//! [`MAX_STRETCH_EXPEDITED`] times (1 ms). The two stretch apart (a cost
//! over the budget at 500 µs may be under it at 1 ms), except that a
//! normal stretch takes the expedited cap to its limit at once. On the
//! EPYC guest the caps end at 2-4 ms and 1 ms; on the Xeon the normal cap
//! stays at 1 ms and the expedited one may go to 1 ms (15 µs is at the
//! budget of a 500 µs nap).
//!
//! What it buys and costs:
//! * a normal wait's CPU stays within the budget wherever a nap costs at
//!   most 4 x 3 % of 1 ms (120 µs); an expedited wait's wherever a nap
//!   costs at most 2 x 3 % of 500 µs (30 µs): at 30-40 µs a nap, expedited
//!   waits burn 3-4 % of a CPU, by choice of latency over CPU;
//! * the latency after the last reader leaves grows only where naps are
//!   that costly, and only for waits that already lasted longer than the
//!   base cap (the nap doubles up to it first);
//! * an expedited request that finds a normal wait's driver asleep waits
//!   for the end of that nap, up to 4 ms where the cap was stretched (1 ms
//!   before); the driver's next nap is then at most 1 ms.
//!
//! `SrcuStats::wait_naps` and `SrcuStats::wait_nap_stretches` count naps
//! and stretches.

use core::time::Duration;

/// How long a driver spins before it starts to nap.
pub(crate) const SPIN_FOR: Duration = Duration::from_micros(50);
/// The first nap.
const FIRST_NAP: Duration = Duration::from_micros(20);
/// The cap of a nap, before stretching.
const MAX_NAP: Duration = Duration::from_millis(1);
/// The cap while an expedited grace period is wanted, before stretching.
const MAX_NAP_EXPEDITED: Duration = Duration::from_micros(500);
/// What a nap at the cap may cost in CPU time, as a percentage of its
/// length, before the cap is doubled.
pub(crate) const CPU_BUDGET_PERCENT: u32 = 3;
/// The cap is stretched to at most this multiple of its base: 4 ms.
pub(crate) const MAX_STRETCH: u32 = 4;
/// The same while an expedited grace period is wanted: 1 ms, so that an
/// expedited wait notices the last reader's departure at most as late as
/// a normal one did before stretching.
pub(crate) const MAX_STRETCH_EXPEDITED: u32 = 2;

/// The naps of one wait.
#[derive(Debug)]
pub(crate) struct Naps {
    /// The next nap, before the cap.
    next: Duration,
    /// The caps' multipliers, normal (1, 2 or 4) and expedited (1 or 2):
    /// a cost over the budget at the expedited cap is half the share at
    /// the normal one, so it does not stretch the normal cap.
    stretch: [u32; 2],
}

impl Naps {
    pub(crate) fn new() -> Naps {
        Naps {
            next: FIRST_NAP,
            stretch: [1, 1],
        }
    }

    /// The cap now.
    pub(crate) fn cap(&self, expedited: bool) -> Duration {
        let base = if expedited {
            MAX_NAP_EXPEDITED
        } else {
            MAX_NAP
        };
        base * self.stretch[expedited as usize]
    }

    /// The nap to take now; the next one is twice as long, up to the cap.
    /// `expedited`: an expedited grace period is wanted (read at each nap:
    /// one may be asked for while the wait goes on).
    pub(crate) fn next(&mut self, expedited: bool) -> Duration {
        let nap = self.next.min(self.cap(expedited));
        self.next = nap * 2;
        nap
    }

    /// True if the cost of a nap of `nap` is worth measuring: it is at
    /// the cap and the cap can still stretch.
    pub(crate) fn measures(&self, nap: Duration, expedited: bool) -> bool {
        self.stretch[expedited as usize] < max_stretch(expedited) && nap >= self.cap(expedited)
    }

    /// A nap that [`measures`](Naps::measures) took `wall` and cost
    /// `cpu` of the thread's CPU time. Returns true if that was over the
    /// budget and the cap was doubled. (The wall time, not the nap asked
    /// for: a timer that oversleeps makes the nap longer and its cost
    /// smaller in proportion.)
    pub(crate) fn cost(&mut self, expedited: bool, wall: Duration, cpu: Duration) -> bool {
        let i = expedited as usize;
        if cpu * 100 > wall * CPU_BUDGET_PERCENT && self.stretch[i] < max_stretch(expedited) {
            self.stretch[i] *= 2;
            if !expedited {
                // Over the budget at 1 ms or more: more so at 500 µs.
                self.stretch[1] = MAX_STRETCH_EXPEDITED;
            }
            return true;
        }
        false
    }
}

fn max_stretch(expedited: bool) -> u32 {
    if expedited {
        MAX_STRETCH_EXPEDITED
    } else {
        MAX_STRETCH
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// Naps double from 20 µs up to the cap, which an expedited request
    /// lowers at once.
    #[test]
    fn naps_double_up_to_the_cap() {
        let mut naps = Naps::new();
        let taken: Vec<_> = (0..8).map(|_| naps.next(false)).collect();
        assert_eq!(
            taken,
            [20, 40, 80, 160, 320, 640, 1000, 1000].map(|n| n * US)
        );
        assert_eq!(naps.next(true), 500 * US);
        assert_eq!(naps.next(false), 1000 * US);
    }

    /// Costly naps at the cap stretch it to 2x, then 4x, and no further;
    /// naps under the budget leave it alone.
    #[test]
    fn costly_naps_stretch_the_cap_up_to_the_limit() {
        let mut naps = Naps::new();
        while naps.next(false) < naps.cap(false) {}
        let nap = naps.cap(false);
        assert!(naps.measures(nap, false));
        // 2 % of the nap: under the budget.
        assert!(!naps.cost(false, nap, 20 * US));
        assert_eq!(naps.cap(false), 1000 * US);
        // 40 µs of CPU a nap, as on the EPYC guest: 4 % of 1 ms.
        assert!(naps.cost(false, nap, 40 * US));
        assert_eq!(naps.cap(false), 2000 * US);
        assert_eq!(naps.next(false), 2000 * US);
        // 2 % of 2 ms: under the budget, the cap stays.
        assert!(!naps.cost(false, 2000 * US, 40 * US));
        // 100 µs: over again.
        assert!(naps.cost(false, 2000 * US, 100 * US));
        assert_eq!(naps.cap(false), 4000 * US);
        assert_eq!(naps.cap(true), 1000 * US, "expedited: 2x at most");
        assert!(!naps.measures(4000 * US, false), "at the limit");
        assert!(!naps.cost(false, 4000 * US, 1000 * US));
        assert_eq!(naps.cap(false), MAX_NAP * MAX_STRETCH);
    }

    /// While an expedited grace period is wanted the cap stretches to
    /// 1 ms at most.
    #[test]
    fn expedited_naps_stretch_to_1ms_at_most() {
        let mut naps = Naps::new();
        while naps.next(true) < naps.cap(true) {}
        assert!(naps.cost(true, 500 * US, 40 * US));
        assert_eq!(naps.cap(true), 1000 * US);
        assert!(!naps.measures(1000 * US, true));
        assert!(
            !naps.cost(true, 1000 * US, 400 * US),
            "at the expedited limit"
        );
        assert!(
            naps.measures(2000 * US, false),
            "a normal wait may stretch on"
        );
    }

    /// A stretch measured at the expedited cap (500 µs) does not stretch
    /// the normal cap, where the same cost per nap is half the share: at
    /// 20 µs a nap (between the Xeon's 15 and the EPYC's 30-40), 500 µs
    /// naps cost 4 % (over the budget), 1 ms naps 2 % (under it). Once the
    /// expedited caller has gone, the wait goes on napping 1 ms, not 2 ms.
    /// (From a review.)
    #[test]
    fn an_expedited_stretch_leaves_a_cheap_normal_cap_alone() {
        let mut naps = Naps::new();
        while naps.next(true) < naps.cap(true) {}
        assert!(naps.cost(true, 500 * US, 20 * US));
        assert_eq!(naps.cap(true), 1000 * US);
        // 20 µs is 2 % of 1 ms: no stretch is due at the normal cap.
        assert!(!naps.cost(false, 1000 * US, 20 * US));
        assert_eq!(naps.cap(false), 1000 * US);
    }

    /// A nap below the cap is not measured (its cost is not yet what
    /// the cap would cost).
    #[test]
    fn naps_below_the_cap_are_not_measured() {
        let mut naps = Naps::new();
        let first = naps.next(false);
        assert!(!naps.measures(first, false));
        assert!(naps.measures(500 * US, true));
        assert!(!naps.measures(500 * US, false));
    }
}
