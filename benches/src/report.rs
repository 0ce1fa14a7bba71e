//! The one-run comparison behind `bench-report`: every measurement of
//! issue 6, medians of repetitions, a markdown table, the targets, and the
//! flat JSON object.

use crate::bus::{self, BusVisitor, DispatchBus, RegisterMode, Startup};
use crate::grace;
use crate::harness::{Concurrent, Stats};
use crate::peers::{self, UpdatePeer};
use crate::read::{self, ReadOp, ReadPeer, ReadVisitor};
use srcu::{Classic, Fast, ReaderMode, Srcu, SrcuStats};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// Sizes and repetition counts of one run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Rounds over all read peers (samples are interleaved across peers).
    pub read_rounds: usize,
    /// Single-thread read samples per peer per round.
    pub read_reps: usize,
    /// Iterations per single-thread read sample.
    pub read_iters: u64,
    /// 2-thread samples per peer per round.
    pub read2_reps: usize,
    /// Duration of one 2-thread sample.
    pub read2_dur: Duration,
    /// 2-thread rows (read and dispatch) keep running spans until they
    /// have this many windows with both threads on a CPU...
    pub min_windows: usize,
    /// ... or this many spans (per read row over all rounds, or per
    /// dispatch row).
    pub max_spans: usize,
    /// Samples of idle grace periods.
    pub gp_idle_reps: usize,
    /// Samples of grace periods under load.
    pub gp_busy_reps: usize,
    /// Samples of grace periods with a long section.
    pub gp_long_reps: usize,
    /// Length of the long section.
    pub gp_long_section: Duration,
    /// Grace periods (one per sample) waiting for one reader that holds a
    /// single section, per flavor and kind (plain, expedited).
    pub gp_reader_reps: usize,
    /// Length of that reader's section (the keys say `reader200ms`
    /// whatever it is).
    pub gp_reader_section: Duration,
    /// Callbacks per `call_srcu` burst.
    pub call_srcu_n: u64,
    /// `call_srcu` bursts.
    pub call_srcu_reps: usize,
    /// Single-thread dispatch samples per bus.
    pub dispatch_reps: usize,
    /// Iterations per dispatch sample.
    pub dispatch_iters: u64,
    /// 2-thread dispatch samples per bus.
    pub dispatch2_reps: usize,
    /// Duration of one 2-thread dispatch sample.
    pub dispatch2_dur: Duration,
    /// Bus sizes for dispatch.
    pub sizes: Vec<usize>,
    /// Registration samples.
    pub register_reps: usize,
    /// Unregistration samples.
    pub unregister_reps: usize,
    /// Kernel ioeventfd registrations (and unregistrations) timed.
    pub kernel_ioeventfd_n: usize,
    /// Devices in `unregister_many` and in the start-up.
    pub many_n: usize,
    /// `unregister_many` samples.
    pub many_reps: usize,
    /// Start-up samples per variant.
    pub startup_reps: usize,
    /// Guest exits per VM sample.
    pub vm_exits: u64,
    /// VM samples (each with and without dispatch).
    pub vm_reps: usize,
}

impl Config {
    /// `--quick`: under a minute on 2 cores.
    pub fn quick() -> Self {
        Config {
            read_rounds: 3,
            read_reps: 11,
            read_iters: 100_000,
            read2_reps: 3,
            read2_dur: Duration::from_millis(50),
            min_windows: 300,
            max_spans: 12,
            gp_idle_reps: 301,
            gp_busy_reps: 101,
            gp_long_reps: 21,
            gp_long_section: Duration::from_millis(1),
            gp_reader_reps: 3,
            gp_reader_section: Duration::from_millis(200),
            call_srcu_n: 100_000,
            call_srcu_reps: 3,
            dispatch_reps: 21,
            dispatch_iters: 50_000,
            dispatch2_reps: 4,
            dispatch2_dur: Duration::from_millis(50),
            sizes: bus::SIZES.to_vec(),
            register_reps: 201,
            unregister_reps: 51,
            kernel_ioeventfd_n: 20,
            many_n: 200,
            many_reps: 7,
            startup_reps: 7,
            vm_exits: 20_000,
            vm_reps: 5,
        }
    }

    /// The default: more repetitions, a few minutes.
    pub fn full() -> Self {
        Config {
            read_rounds: 5,
            read_reps: 21,
            read_iters: 200_000,
            read2_reps: 5,
            read2_dur: Duration::from_millis(100),
            min_windows: 1000,
            max_spans: 30,
            gp_idle_reps: 1001,
            gp_busy_reps: 301,
            gp_long_reps: 51,
            gp_reader_reps: 5,
            call_srcu_n: 200_000,
            call_srcu_reps: 5,
            dispatch_reps: 51,
            dispatch_iters: 100_000,
            dispatch2_reps: 15,
            dispatch2_dur: Duration::from_millis(100),
            register_reps: 1001,
            unregister_reps: 201,
            kernel_ioeventfd_n: 50,
            many_reps: 21,
            startup_reps: 21,
            vm_exits: 50_000,
            vm_reps: 11,
            ..Self::quick()
        }
    }

    /// Every measurement once at a tiny size (the smoke test).
    pub fn tiny() -> Self {
        Config {
            read_rounds: 1,
            read_reps: 1,
            read_iters: 100,
            read2_reps: 1,
            read2_dur: Duration::from_millis(2),
            min_windows: 0,
            max_spans: 1,
            gp_idle_reps: 3,
            gp_busy_reps: 3,
            gp_long_reps: 1,
            gp_long_section: Duration::from_millis(1),
            gp_reader_reps: 1,
            gp_reader_section: Duration::from_millis(20),
            call_srcu_n: 100,
            call_srcu_reps: 1,
            dispatch_reps: 1,
            dispatch_iters: 100,
            dispatch2_reps: 1,
            dispatch2_dur: Duration::from_millis(2),
            sizes: bus::SIZES.to_vec(),
            register_reps: 3,
            unregister_reps: 2,
            kernel_ioeventfd_n: 2,
            many_n: 20,
            many_reps: 1,
            startup_reps: 1,
            vm_exits: 100,
            vm_reps: 1,
        }
    }
}

/// One line of the table.
#[derive(Clone, Debug)]
pub struct Row {
    /// Section heading.
    pub group: &'static str,
    /// What was measured.
    pub name: String,
    /// JSON key, if any.
    pub key: Option<String>,
    /// Median, ns.
    pub ns: f64,
    /// Number of samples the median is over.
    pub reps: usize,
    /// Smallest and largest sample.
    pub min_max: (f64, f64),
    /// The srcu row of the same comparison (for the ratio column).
    pub baseline: Option<f64>,
    /// Extra remark.
    pub note: String,
}

/// The result of a run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Table rows, in order.
    pub rows: Vec<Row>,
    /// Flat JSON numbers (ns unless the key says otherwise).
    pub values: BTreeMap<String, f64>,
    /// Lines printed before the table (machine, modes).
    pub header: Vec<String>,
    /// Measurements that could not run, with the reason.
    pub skipped: Vec<String>,
}

impl Report {
    fn add(
        &mut self,
        group: &'static str,
        name: impl Into<String>,
        key: Option<&str>,
        stats: &Stats,
        baseline: Option<f64>,
    ) -> f64 {
        let ns = stats.median();
        if let Some(k) = key {
            self.values.insert(k.to_string(), ns);
        }
        self.rows.push(Row {
            group,
            name: name.into(),
            key: key.map(str::to_string),
            ns,
            reps: stats.reps(),
            min_max: stats.min_max(),
            baseline,
            note: String::new(),
        });
        ns
    }

    fn note(&mut self, note: impl Into<String>) {
        if let Some(r) = self.rows.last_mut() {
            r.note = note.into();
        }
    }

    /// A value by JSON key.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.get(key).copied()
    }
}

fn fmt_ns(ns: f64) -> String {
    if !ns.is_finite() {
        "n/a".into()
    } else if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e4 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns >= 100.0 {
        format!("{:.0} ns", ns)
    } else {
        format!("{:.2} ns", ns)
    }
}

/// (peer, op) -> (visit order, ns samples, 2-thread details).
type ReadSamples = BTreeMap<(&'static str, &'static str), (usize, Vec<f64>, Vec<Concurrent>)>;

struct ReadCollect<'a> {
    cfg: &'a Config,
    one: &'a mut ReadSamples,
    two: &'a mut ReadSamples,
    order: &'a mut Vec<(&'static str, &'static str)>,
    order_index: usize,
}

impl ReadVisitor for ReadCollect<'_> {
    fn visit<P: ReadPeer>(&mut self, peer: &P) {
        if !self.order.iter().any(|(k, _)| *k == P::KEY) {
            self.order.push((P::KEY, P::LABEL));
        }
        self.order_index += 1;
        for op in ReadOp::ALL {
            // Warm-up (thread-local registration of crossbeam, rseq, caches).
            read::one_thread_ns(peer, op, self.cfg.read_iters / 10 + 1);
            let e =
                self.one
                    .entry((P::KEY, op.name()))
                    .or_insert((self.order_index, vec![], vec![]));
            for _ in 0..self.cfg.read_reps {
                e.1.push(read::one_thread_ns(peer, op, self.cfg.read_iters));
            }
            let e =
                self.two
                    .entry((P::KEY, op.name()))
                    .or_insert((self.order_index, vec![], vec![]));
            let want = e.1.len() + self.cfg.min_windows / self.cfg.read_rounds.max(1);
            let max_spans = (self.cfg.max_spans / self.cfg.read_rounds.max(1)).max(1);
            let mut spans = 0;
            while spans < self.cfg.read2_reps || (e.1.len() < want && spans < max_spans) {
                let c = read::threads_ns(peer, op, 2, self.cfg.read2_dur);
                e.1.extend_from_slice(&c.window_ns);
                e.2.push(c);
                spans += 1;
            }
        }
    }
}

fn median_of(v: impl Iterator<Item = f64>) -> f64 {
    Stats {
        samples: v.collect(),
    }
    .median()
}

/// The note of a 2-thread row: how concurrent the run really was.
fn concurrent_note(cs: &[Concurrent]) -> String {
    format!(
        "{} spans; both threads on CPU in {:.0}% of windows (on CPU {:.0}% of the span); \
         whole-span wall-clock figure {}",
        cs.len(),
        100.0 * median_of(cs.iter().map(|c| c.concurrent_windows)),
        100.0 * median_of(cs.iter().map(|c| c.on_cpu)),
        fmt_ns(median_of(cs.iter().map(|c| c.wall_ns_per_op)))
    )
}

fn run_read(cfg: &Config, rep: &mut Report) {
    let mut one = BTreeMap::new();
    let mut two = BTreeMap::new();
    let mut order = Vec::new();
    for _ in 0..cfg.read_rounds {
        read::for_each_peer(&mut ReadCollect {
            cfg,
            one: &mut one,
            two: &mut two,
            order: &mut order,
            order_index: 0,
        });
    }
    for (threads, map, group) in [
        (1, &one, "1. Read section, 1 thread"),
        (
            2,
            &two,
            "1. Read section, 2 threads at once (per-thread cost)",
        ),
    ] {
        for op in ReadOp::ALL {
            let base = Stats {
                samples: map[&("srcu", op.name())].1.clone(),
            }
            .median();
            for (key, label) in &order {
                let stats = Stats {
                    samples: map[&(*key, op.name())].1.clone(),
                };
                let sfx = if threads == 2 { "_2t" } else { "" };
                let json = match op {
                    ReadOp::LockUnlock => format!("read_{key}{sfx}_ns"),
                    ReadOp::LockDerefUnlock => format!("read_deref_{key}{sfx}_ns"),
                };
                let what = match op {
                    ReadOp::LockUnlock => "lock+unlock",
                    ReadOp::LockDerefUnlock => "lock+deref+unlock",
                };
                rep.add(
                    group,
                    format!("{label}: {what}"),
                    Some(&json),
                    &stats,
                    Some(base),
                );
                if threads == 1 && matches!(*key, "srcu_fast" | "srcu_fast_untracked") {
                    // The fast section against its floor, round by round:
                    // each round times the two one after the other, so
                    // a round's ratio is free of the minute-scale changes
                    // in the machine's speed that the medians above mix.
                    // (No floor row without rseq.)
                    let floor = map.get(&("rseq_pair_floor", op.name()));
                    if let Some(rounds) =
                        floor.and_then(|f| paired_round_ratios(&stats.samples, &f.1, cfg.read_reps))
                    {
                        let m = median_of(rounds.iter().copied());
                        let (lo, hi) = Stats { samples: rounds }.min_max();
                        rep.note(format!(
                            "per round, x the floor timed in the same round: median {m:.2}, {lo:.2} .. {hi:.2}"
                        ));
                        rep.values
                            .insert(json.replace("_ns", "_per_round_floor_ratio"), m);
                    }
                }
                let cs = &map[&(*key, op.name())].2;
                if !cs.is_empty() {
                    rep.note(concurrent_note(cs));
                    rep.values.insert(
                        json.replace("_ns", "_wall_ns"),
                        median_of(cs.iter().map(|c| c.wall_ns_per_op)),
                    );
                }
            }
        }
    }
}

/// The ratios of the medians of `a` and `b` round by round (each round:
/// `reps` consecutive samples of each), or `None` if they were not taken
/// in the same rounds.
fn paired_round_ratios(a: &[f64], b: &[f64], reps: usize) -> Option<Vec<f64>> {
    if reps == 0 || a.len() != b.len() || a.is_empty() || !a.len().is_multiple_of(reps) {
        return None;
    }
    let round_median = |c: &[f64]| median_of(c.iter().copied());
    Some(
        a.chunks(reps)
            .zip(b.chunks(reps))
            .map(|(x, y)| round_median(x) / round_median(y))
            .collect(),
    )
}

/// The note of a grace-period row: what its calls cost besides time.
fn gp_note(d: &SrcuStats, fast_mode: bool) -> String {
    let per = |n: u64| n as f64 / d.grace_periods.max(1) as f64;
    let mut s = format!("{} GPs", d.grace_periods);
    if fast_mode {
        let _ = write!(s, "; {:.2} membarriers per GP", per(d.membarriers));
        if d.membarrier_fallbacks > 0 {
            let _ = write!(s, " ({} mprotect fallbacks!)", d.membarrier_fallbacks);
        }
    }
    let _ = write!(s, "; {:.2} scans per GP", per(d.scans));
    if d.waits > 0 {
        let _ = write!(
            s,
            "; {} waits, {} wall, {} CPU ({:.1}%)",
            d.waits,
            fmt_ns(d.wait_wall_ns as f64),
            fmt_ns(d.wait_cpu_ns as f64),
            100.0 * d.wait_cpu_ns as f64 / d.wait_wall_ns.max(1) as f64
        );
    }
    s
}

fn run_grace(cfg: &Config, rep: &mut Report) {
    const G: &str = "2. Grace periods";
    let c = grace::domain::<Classic>();
    let f = grace::domain::<Fast>();
    // Side effects are counted only where they exist: a fast domain without
    // membarrier runs the classic barriers (and counts no membarrier).
    let mb = f.reader_mode() == ReaderMode::Membarrier;
    let idle_c = grace::idle(&c, cfg.gp_idle_reps, false);
    // The floor right before the fast grace periods made of it.
    let floor = grace::membarrier::call_ns(cfg.gp_idle_reps);
    let idle_f = grace::idle(&f, cfg.gp_idle_reps, false);
    let idle_ce = grace::idle(&c, cfg.gp_idle_reps, true);
    let idle_fe = grace::idle(&f, cfg.gp_idle_reps, true);
    let floor_ns = floor.as_ref().map_or(f64::NAN, Stats::median);
    let base = rep.add(
        G,
        "synchronize, idle (classic)",
        Some("synchronize_idle_ns"),
        &idle_c.latency,
        None,
    );
    rep.note(gp_note(&idle_c.delta, false));
    for (name, key, mkey, m, fast) in [
        (
            "synchronize, idle (fast)",
            "synchronize_fast_idle_ns",
            Some("membarriers_per_idle_gp_fast"),
            &idle_f,
            true,
        ),
        (
            "synchronize_expedited, idle (classic)",
            "synchronize_expedited_idle_ns",
            None,
            &idle_ce,
            false,
        ),
        (
            "synchronize_expedited, idle (fast)",
            "synchronize_expedited_fast_idle_ns",
            Some("membarriers_per_idle_gp_expedited_fast"),
            &idle_fe,
            true,
        ),
    ] {
        let ns = rep.add(G, name, Some(key), &m.latency, Some(base));
        let mut note = gp_note(&m.delta, fast && mb);
        if fast && mb {
            if let Some(k) = mkey {
                rep.values.insert(k.into(), m.membarriers_per_gp());
            }
            if floor_ns.is_finite() {
                let _ = write!(note, "; {:.2} x one bare membarrier", ns / floor_ns);
            }
        }
        rep.note(note);
    }
    match floor {
        Some(fl) => {
            rep.add(
                G,
                "(ref) one bare membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) call",
                Some("membarrier_call_ns"),
                &fl,
                Some(base),
            );
            rep.note("the physical floor of each membarrier a fast grace period issues");
        }
        None => rep
            .skipped
            .push("membarrier floor: membarrier(PRIVATE_EXPEDITED) unavailable".into()),
    }
    for (srcu_flavor, exp, name, key) in [
        (
            "classic",
            false,
            "synchronize, 2 threads entering/leaving (classic)",
            "synchronize_busy_ns",
        ),
        (
            "fast",
            false,
            "synchronize, 2 threads entering/leaving (fast)",
            "synchronize_fast_busy_ns",
        ),
        (
            "classic",
            true,
            "synchronize_expedited, 2 threads entering/leaving (classic)",
            "synchronize_expedited_busy_ns",
        ),
        (
            "fast",
            true,
            "synchronize_expedited, 2 threads entering/leaving (fast)",
            "synchronize_expedited_fast_busy_ns",
        ),
    ] {
        let fast = srcu_flavor == "fast";
        let ((s, n), d) = if fast {
            grace::with_stats(&f, || grace::synchronize_busy(&f, 2, cfg.gp_busy_reps, exp))
        } else {
            grace::with_stats(&c, || grace::synchronize_busy(&c, 2, cfg.gp_busy_reps, exp))
        };
        rep.add(G, name, Some(key), &s, Some(base));
        rep.note(format!(
            "{n} reader sections meanwhile; {}",
            gp_note(&d, fast && mb)
        ));
        if fast && mb {
            let e = if exp { "_expedited" } else { "" };
            rep.values.insert(
                format!("membarriers_per_gp_busy{e}_fast"),
                d.membarriers as f64 / d.grace_periods.max(1) as f64,
            );
        }
    }
    let ms = cfg.gp_long_section.as_secs_f64() * 1e3;
    for (name, key, exp) in [
        ("synchronize", "synchronize_long_section_ns", false),
        (
            "synchronize_expedited",
            "synchronize_expedited_long_section_ns",
            true,
        ),
    ] {
        let (s, d) = grace::with_stats(&c, || {
            grace::synchronize_long_section(&c, cfg.gp_long_section, cfg.gp_long_reps, exp)
        });
        rep.add(
            G,
            format!("{name}, one thread in back-to-back {ms} ms sections (classic)"),
            Some(key),
            &s,
            Some(base),
        );
        rep.note(gp_note(&d, false));
    }
    let (s, d) = grace::with_stats(&f, || {
        grace::synchronize_long_section(&f, cfg.gp_long_section, cfg.gp_long_reps, false)
    });
    rep.add(
        G,
        format!("synchronize, one thread in back-to-back {ms} ms sections (fast)"),
        Some("synchronize_fast_long_section_ns"),
        &s,
        Some(base),
    );
    rep.note(gp_note(&d, mb));
    if mb {
        rep.values.insert(
            "membarriers_per_gp_long_section_fast".into(),
            d.membarriers as f64 / d.grace_periods.max(1) as f64,
        );
    }
    for (flavor, b) in [("classic", None), ("fast", Some(()))] {
        let bursts: Vec<grace::CallSrcu> = (0..cfg.call_srcu_reps)
            .map(|_| match b {
                None => grace::call_srcu_burst(&c, cfg.call_srcu_n),
                Some(()) => grace::call_srcu_burst(&f, cfg.call_srcu_n),
            })
            .collect();
        let sfx = if b.is_some() { "_fast" } else { "" };
        let enq = Stats {
            samples: bursts.iter().map(|b| b.enqueue_ns).collect(),
        };
        rep.add(
            G,
            format!(
                "call_srcu, enqueue ({flavor}; burst of {})",
                cfg.call_srcu_n
            ),
            Some(&format!("call_srcu{sfx}_ns")),
            &enq,
            None,
        );
        let ret = Stats {
            samples: bursts.iter().map(|b| b.retire_ns).collect(),
        };
        rep.add(
            G,
            format!("call_srcu, burst until barrier returns, per callback ({flavor})"),
            Some(&format!("call_srcu{sfx}_retire_ns")),
            &ret,
            None,
        );
        let per = Stats {
            samples: bursts.iter().map(|b| b.per_gp).collect(),
        }
        .median();
        rep.values
            .insert(format!("call_srcu{sfx}_callbacks_per_gp"), per);
        rep.note(format!("{per:.0} callbacks retired per grace period"));
    }
}

/// One grace period waiting for one reader blocked in a long section,
/// both flavors, plain and expedited: latency, `membarrier` calls per grace
/// period, and the CPU the waiting thread burnt.
fn run_grace_reader(cfg: &Config, rep: &mut Report) {
    let ms = cfg.gp_reader_section.as_secs_f64() * 1e3;
    const G: &str = "2. Grace period waiting for one reader sleeping in one long section \
                     (one GP per sample; side effects from srcu.stats() deltas)";
    let c = grace::domain::<Classic>();
    let f = grace::domain::<Fast>();
    let mb = f.reader_mode() == ReaderMode::Membarrier;
    for (fast, exp) in [(false, false), (true, false), (false, true), (true, true)] {
        let samples: Vec<grace::ReaderWait> = (0..cfg.gp_reader_reps)
            .map(|_| {
                if fast {
                    grace::against_reader(&f, cfg.gp_reader_section, exp)
                } else {
                    grace::against_reader(&c, cfg.gp_reader_section, exp)
                }
            })
            .collect();
        let flavor = if fast { "fast" } else { "classic" };
        let (call, e) = if exp {
            ("synchronize_expedited", "_expedited")
        } else {
            ("synchronize", "")
        };
        let lat = Stats {
            samples: samples.iter().map(|w| w.latency_ns).collect(),
        };
        rep.add(
            G,
            format!("{call} ({flavor}), the reader entered a {ms} ms section just before"),
            Some(&format!("{call}_reader200ms_{flavor}_ns")),
            &lat,
            None,
        );
        let sum = |f: fn(&SrcuStats) -> u64| samples.iter().map(|w| f(&w.delta)).sum::<u64>();
        let (mbs, gps) = (sum(|d| d.membarriers), sum(|d| d.grace_periods));
        let wait_frac = median_of(samples.iter().map(grace::ReaderWait::wait_cpu_frac));
        let caller_frac = median_of(samples.iter().map(grace::ReaderWait::caller_cpu_frac));
        let over = median_of(samples.iter().map(|w| w.overshoot_ns));
        rep.values
            .insert(format!("wait_cpu_frac_reader200ms{e}_{flavor}"), wait_frac);
        rep.values.insert(
            format!("caller_cpu_frac_reader200ms{e}_{flavor}"),
            caller_frac,
        );
        rep.values
            .insert(format!("{call}_reader200ms_{flavor}_overshoot_ns"), over);
        let mut note = String::new();
        if fast && mb {
            let per = mbs as f64 / gps.max(1) as f64;
            rep.values
                .insert(format!("membarriers_per_gp_reader200ms{e}_fast"), per);
            let _ = write!(note, "{per:.2} membarriers per GP ({mbs} in {gps} GPs); ");
        }
        let (waits, wall, cpu, naps, stretches) = (
            sum(|d| d.waits),
            sum(|d| d.wait_wall_ns),
            sum(|d| d.wait_cpu_ns),
            sum(|d| d.wait_naps),
            sum(|d| d.wait_nap_stretches),
        );
        let _ = write!(
            note,
            "wait CPU {:.3}% of the wait beyond its first 100 µs (stats, median; in all \
             {waits} waits, {} wall, {} CPU, {naps} naps, {} CPU each, {stretches} nap cap \
             stretches); caller thread CPU {:.3}% (clock_gettime, median); \
             returned {} after the reader left (median)",
            100.0 * wait_frac,
            fmt_ns(wall as f64),
            fmt_ns(cpu as f64),
            fmt_ns(cpu as f64 / naps.max(1) as f64),
            100.0 * caller_frac,
            fmt_ns(over),
        );
        rep.note(note);
    }
}

/// One dispatch peer, type-erased so that all peers of a size can be
/// measured in rotation (the hot loops stay monomorphic inside).
trait DispatchPeer {
    fn key(&self) -> &'static str;
    fn label(&self) -> &'static str;
    fn dispatch(&self, addr: u64) -> bool;
    fn one(&self, addr: u64, iters: u64) -> f64;
    fn two(&self, addr: u64, dur: Duration) -> Concurrent;
}

struct Held<B>(B);

impl<B: DispatchBus> DispatchPeer for Held<B> {
    fn key(&self) -> &'static str {
        B::KEY
    }
    fn label(&self) -> &'static str {
        B::LABEL
    }
    fn dispatch(&self, addr: u64) -> bool {
        self.0.dispatch(addr, &[0; 4])
    }
    fn one(&self, addr: u64, iters: u64) -> f64 {
        bus::dispatch_ns(&self.0, addr, iters)
    }
    fn two(&self, addr: u64, dur: Duration) -> Concurrent {
        bus::dispatch_threads_ns(&self.0, addr, 2, dur)
    }
}

/// Builds every bus of [`bus::for_each_bus`] with `n` devices.
struct Build {
    n: usize,
    peers: Vec<Box<dyn DispatchPeer>>,
}

impl BusVisitor for Build {
    fn visit<B: DispatchBus>(&mut self) {
        self.peers.push(Box::new(Held(B::with_devices(self.n))));
    }
}

/// Dispatch on every bus size: all peers of a size are built first, then
/// measured in rotation, one sample (1 thread) or one span (2 threads) of
/// each in turn, so that a change in the machine's speed (other tenants,
/// frequency) hits every peer alike instead of whichever ran then.
fn run_dispatch(cfg: &Config, rep: &mut Report) {
    const G: &str = "3. Bus dispatch (lookup + no-op device write)";
    for &n in &cfg.sizes {
        let mut b = Build { n, peers: vec![] };
        bus::for_each_bus(&mut b);
        let peers = b.peers;
        let addr = bus::target(n);
        for p in &peers {
            assert!(p.dispatch(addr), "{} does not dispatch", p.label());
            p.one(addr, cfg.dispatch_iters / 10 + 1);
        }
        let mut one: Vec<Vec<f64>> = vec![Vec::new(); peers.len()];
        for _ in 0..cfg.dispatch_reps {
            for (p, s) in peers.iter().zip(&mut one) {
                s.push(p.one(addr, cfg.dispatch_iters));
            }
        }
        let mut two: Vec<Vec<Concurrent>> = vec![Vec::new(); peers.len()];
        loop {
            let mut ran = false;
            for (p, cs) in peers.iter().zip(&mut two) {
                let windows: usize = cs.iter().map(|c| c.window_ns.len()).sum();
                if cs.len() < cfg.dispatch2_reps
                    || (windows < cfg.min_windows && cs.len() < cfg.max_spans)
                {
                    cs.push(p.two(addr, cfg.dispatch2_dur));
                    ran = true;
                }
            }
            if !ran {
                break;
            }
        }
        let one: Vec<Stats> = one.into_iter().map(|samples| Stats { samples }).collect();
        let two_stats: Vec<Stats> = two
            .iter()
            .map(|cs| Stats {
                samples: cs
                    .iter()
                    .flat_map(|c| c.window_ns.iter().copied())
                    .collect(),
            })
            .collect();
        // kvm-bus classic is built first: the baseline of the ratios.
        let (base1, base2) = (one[0].median(), two_stats[0].median());
        // What each kvm-bus flavor costs above the same table dispatched
        // with no synchronisation (the bare-table row, in the same
        // rotation): the part of a row that the flavor decides.
        let at = |key: &str| peers.iter().position(|p| p.key() == key);
        let above_bare = |stats: &[Stats], i: usize| {
            let bare = at(bus::BareTableBus::KEY)?;
            let (classic, fast) = (at("srcu")?, at("srcu_fast")?);
            let floor = stats[bare].median();
            let (c, f) = (
                stats[classic].median() - floor,
                stats[fast].median() - floor,
            );
            (i == fast).then(|| {
                format!(
                    "above the bare table ({floor:.2} ns): fast +{f:.2} ns, classic +{c:.2} ns ({:.2} x)",
                    f / c
                )
            })
        };
        for (i, p) in peers.iter().enumerate() {
            let key = format!("dispatch{n}_{}_ns", p.key());
            rep.add(
                G,
                format!("{}, {n} devices, 1 thread", p.label()),
                Some(&key),
                &one[i],
                Some(base1),
            );
            if let Some(note) = above_bare(&one, i) {
                rep.note(note);
            }
        }
        for (i, p) in peers.iter().enumerate() {
            let key = format!("dispatch{n}_{}_2t_ns", p.key());
            rep.add(
                G,
                format!("{}, {n} devices, 2 threads", p.label()),
                Some(&key),
                &two_stats[i],
                Some(base2),
            );
            let mut note = concurrent_note(&two[i]);
            if let Some(bare) = above_bare(&two_stats, i) {
                note = format!("{bare}; {note}");
            }
            rep.note(note);
            rep.values.insert(
                format!("dispatch{n}_{}_2t_wall_ns", p.key()),
                median_of(two[i].iter().map(|c| c.wall_ns_per_op)),
            );
        }
    }
}

/// kvm-bus's `register_dev` (classic, deferred free) and the kernel's
/// `KVM_IOEVENTFD` assign in turns: a batch of 50 of ours (then one
/// `unregister_many`), a batch of 50 of the kernel's assigns (then their
/// deassigns), and again, `rounds` times. Returns (ours, the kernel's
/// assigns).
///
/// Not what the target uses (`register_ns` is measured back to back, as a
/// VMM's start-up registers): on these nested-KVM hosts, after a batch of
/// the kernel's deassigns (each an expedited SRCU grace period, with its
/// IPIs) allocating and copying memory is slower for milliseconds (a probe
/// of 50 allocations and copies of 1.6 KB: 11-12 us before, 15-17 us
/// after; a multiply-add chain is unchanged), and a registration, which
/// allocates and copies its table, with it; a fresh VM per batch (created,
/// 50 assigns, dropped) does the same. Assigns alone, or a sleep as long as
/// the kernel's batch, slow it far less (not at all in a quiet phase,
/// 1.2-1.3x in a busy one, against 1.6-2.5x after deassigns;
/// `benches/examples/lookup.rs turns`). A VMM that interleaves
/// registrations with ioeventfd removals pays this row, not `register_ns`.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn register_in_turns(vm: &crate::vm::IoeventVm, rounds: usize) -> (Stats, Stats) {
    let buses = kvm_bus::Buses::new();
    let (mut ours, mut kernel) = (vec![], vec![]);
    for _ in 0..rounds {
        ours.extend(bus::register_latency(&buses, RegisterMode::Deferred, 50, 50).samples);
        kernel.extend(vm.register_unregister(50).0.samples);
    }
    (Stats { samples: ours }, Stats { samples: kernel })
}

fn run_registration(cfg: &Config, rep: &mut Report) {
    const G: &str = "3. Bus registration (no readers unless stated)";
    let buses = kvm_bus::Buses::new();
    let reg = rep.add(
        G,
        "kvm-bus register_dev (deferred free)",
        Some("register_ns"),
        &bus::register_latency(&buses, RegisterMode::Deferred, cfg.register_reps, 50),
        None,
    );
    rep.add(
        G,
        "kvm-bus register_dev (deferred free, fast)",
        Some("register_fast_ns"),
        &bus::register_latency(
            &kvm_bus::Buses::new_fast(),
            RegisterMode::Deferred,
            cfg.register_reps,
            50,
        ),
        Some(reg),
    );
    let (moves, with_trim, without) =
        bus::move_range_after_quiet_latency(&buses, cfg.unregister_reps);
    let quiet_move = rep.add(
        G,
        "kvm-bus move_range after a quiet spell (an isolated BAR move, 16-device bus)",
        Some("move_range_after_quiet_ns"),
        &moves,
        Some(reg),
    );
    // (NaN where no sample fell on that side.)
    let (trim_ns, no_trim_ns) = (with_trim.median(), without.median());
    rep.values
        .insert("move_range_after_quiet_trim_ns".into(), trim_ns);
    rep.values
        .insert("move_range_after_quiet_no_trim_ns".into(), no_trim_ns);
    rep.note(format!(
        "each after a 6 ms sleep, the first update after the callback worker went to sleep; \
         {} of {} carried a trim (the kept tables would pass 16 KiB), whose call_srcu wakes the \
         worker (a futex wake, an IPI where its CPU is idle): median {} (`_trim_ns`), the others \
         {} (`_no_trim_ns`); most of that is running right after the sleep (cold caches: the \
         same move done hot is `move_range_ns`)",
        with_trim.samples.len(),
        moves.samples.len(),
        fmt_ns(trim_ns),
        fmt_ns(no_trim_ns),
    ));
    rep.add(
        G,
        "register_dev + synchronize inside (pre-6.18 behaviour)",
        Some("register_sync_ns"),
        &bus::register_latency(&buses, RegisterMode::SyncInside, cfg.register_reps, 50),
        Some(reg),
    );
    let peer_updates = [
        peer_update::<peers::VmDeviceBus>(
            cfg,
            "register_mmio (write lock)",
            "deregister_mmio (write lock)",
        ),
        peer_update::<peers::ChBus>(
            cfg,
            "insert (read-lock scan, write lock)",
            "remove (write lock)",
        ),
        peer_update::<peers::DragonballBus>(
            cfg,
            "copy-on-write insert, store",
            "copy-on-write remove, store",
        ),
    ];
    for p in &peer_updates {
        rep.add(
            G,
            format!("{}: {}", p.label, p.register_what),
            Some(&format!("register_{}_ns", p.key)),
            &p.register,
            Some(reg),
        );
    }
    let unreg_stats = bus::unregister_latency(&buses, cfg.unregister_reps);
    let unreg_fast = bus::unregister_latency(&kvm_bus::Buses::new_fast(), cfg.unregister_reps);
    let unreg_busy = bus::unregister_latency_busy::<Classic>(cfg.unregister_reps, 2);
    let many = bus::unregister_many_latency(&buses, cfg.many_n, cfg.many_reps);
    let mut kernel = None;
    let mut kernel_vcpu = None;
    let mut unreg_vcpu = None;
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    match crate::vm::IoeventVm::new() {
        Ok(vm) => {
            let (r, u) = vm.register_unregister(cfg.kernel_ioeventfd_n);
            rep.add(
                G,
                "kernel KVM_IOEVENTFD assign (PIO, VM fd, no vCPU)",
                Some("kernel_ioeventfd_register_ns"),
                &r,
                Some(reg),
            );
            kernel = Some(u);
            rep.add(
                G,
                "kernel KVM_IOEVENTFD assign after a quiet spell (PIO, VM fd, no vCPU; an assign, not a move)",
                Some("kernel_ioeventfd_register_after_quiet_ns"),
                &vm.assign_after_quiet(cfg.unregister_reps),
                Some(quiet_move),
            );
            rep.note(
                "each after a 6 ms sleep, as kvm-bus's isolated BAR move above: whatever runs \
                 first after the thread slept is slower here (cold caches), the kernel too",
            );
            let (ours, theirs) = register_in_turns(&vm, cfg.kernel_ioeventfd_n.div_ceil(10));
            rep.add(
                G,
                "kvm-bus register_dev, in turns with the kernel's assign + deassign (batches of 50)",
                Some("register_in_turns_ns"),
                &ours,
                Some(reg),
            );
            rep.note("slower after the kernel's deassigns: see `register_in_turns` in report.rs");
            rep.add(
                G,
                "kernel KVM_IOEVENTFD assign, in turns with kvm-bus register_dev (batches of 50)",
                Some("kernel_ioeventfd_register_in_turns_ns"),
                &theirs,
                Some(reg),
            );
            match crate::vm::PioVm::new()
                .and_then(|mut v| v.ioeventfd_while_running(cfg.kernel_ioeventfd_n))
            {
                Ok((r, u)) => {
                    rep.add(
                        G,
                        "kernel KVM_IOEVENTFD assign (PIO, vCPU running guest PIO loop)",
                        Some("kernel_ioeventfd_register_vcpu_ns"),
                        &r,
                        Some(reg),
                    );
                    kernel_vcpu = Some(u);
                }
                Err(e) => rep
                    .skipped
                    .push(format!("kernel KVM_IOEVENTFD with a vCPU: {e}")),
            }
            let buses = crate::vm::pio_buses::<Classic>(15);
            match crate::vm::PioVm::new().and_then(|mut v| {
                v.while_running(Some(&buses), |_| {
                    bus::unregister_latency(&buses, cfg.unregister_reps)
                })
            }) {
                Ok(u) => unreg_vcpu = Some(u),
                Err(e) => rep
                    .skipped
                    .push(format!("kvm-bus unregister with a vCPU: {e}")),
            }
        }
        Err(e) => rep.skipped.push(format!("kernel KVM_IOEVENTFD: {e}")),
    }
    let unreg = rep.add(
        G,
        "kvm-bus unregister_dev (one grace period, classic)",
        Some("unregister_ns"),
        &unreg_stats,
        None,
    );
    rep.add(
        G,
        "kvm-bus unregister_dev (one grace period, fast)",
        Some("unregister_fast_ns"),
        &unreg_fast,
        Some(unreg),
    );
    rep.add(
        G,
        "kvm-bus unregister_dev, 2 threads dispatching back to back (stress: readers always inside a section)",
        Some("unregister_busy_ns"),
        &unreg_busy,
        Some(unreg),
    );
    if let Some(u) = unreg_vcpu {
        rep.add(
            G,
            "kvm-bus unregister_dev, vCPU running guest PIO loop dispatching on these buses",
            Some("unregister_vcpu_ns"),
            &u,
            Some(unreg),
        );
    }
    let unreg_busy_ns = rep.get("unregister_busy_ns").unwrap_or(f64::NAN);
    for p in &peer_updates {
        rep.add(
            G,
            format!("{}: {}", p.label, p.unregister_what),
            Some(&format!("unregister_{}_ns", p.key)),
            &p.unregister,
            Some(unreg),
        );
        rep.note(p.removal);
        rep.add(
            G,
            format!(
                "{}: {}, 2 threads dispatching back to back",
                p.label, p.unregister_what
            ),
            Some(&format!("unregister_busy_{}_ns", p.key)),
            &p.unregister_busy,
            Some(unreg_busy_ns),
        );
    }
    if let Some(u) = kernel {
        rep.add(
            G,
            "kernel KVM_IOEVENTFD deassign (PIO, VM fd, no vCPU)",
            Some("kernel_ioeventfd_unregister_ns"),
            &u,
            Some(unreg),
        );
    }
    if let Some(u) = kernel_vcpu {
        rep.add(
            G,
            "kernel KVM_IOEVENTFD deassign (PIO, vCPU running guest PIO loop)",
            Some("kernel_ioeventfd_unregister_vcpu_ns"),
            &u,
            Some(unreg),
        );
    }
    rep.add(
        G,
        format!("kvm-bus unregister_many of {} (total)", cfg.many_n),
        Some(&format!("unregister_many{}_ns", cfg.many_n)),
        &many,
        Some(unreg),
    );
    // Guest-driven reconfiguration: a BAR move, an eject started by a
    // device handler (inside its access's read section).
    let fast = kvm_bus::Buses::new_fast();
    let mv = bus::move_range_latency(&buses, cfg.register_reps, 50);
    let mv_fast = bus::move_range_latency(&fast, cfg.register_reps, 50);
    let (start, complete) = bus::removal_latency(&buses, cfg.unregister_reps);
    let (start_fast, complete_fast) = bus::removal_latency(&fast, cfg.unregister_reps);
    rep.add(
        G,
        "kvm-bus move_range (BAR relocation, deferred free, classic)",
        Some("move_range_ns"),
        &mv,
        Some(reg),
    );
    rep.add(
        G,
        "kvm-bus move_range (BAR relocation, deferred free, fast)",
        Some("move_range_fast_ns"),
        &mv_fast,
        Some(reg),
    );
    for (flavor, sfx, st, co) in [
        ("classic", "", &start, &complete),
        ("fast", "_fast", &start_fast, &complete_fast),
    ] {
        rep.add(
            G,
            format!(
                "kvm-bus start_unregister from inside a read section (handler eject), \
                 to its return: unpublished ({flavor})"
            ),
            Some(&format!("start_unregister{sfx}_ns")),
            st,
            Some(unreg),
        );
        rep.add(
            G,
            format!(
                "kvm-bus handler eject, start_unregister to Removal::wait returning: \
                 complete ({flavor})"
            ),
            Some(&format!("removal_complete{sfx}_ns")),
            co,
            Some(unreg),
        );
        rep.note("the section of the access that started it ends in between");
    }
    const S: &str = "3. VM start-up (2 reader threads dispatching throughout)";
    let n = cfg.many_n;
    let startup = |how| {
        let mut dispatches = 0;
        let s = Stats::collect(cfg.startup_reps, || {
            let (ns, d) = bus::startup::<Classic>(how, n, 2);
            dispatches += d;
            ns
        });
        (s, dispatches / cfg.startup_reps as u64)
    };
    let (s, d) = startup(Startup::OneByOne);
    let base = rep.add(
        S,
        format!("{n} x register_dev, one by one (deferred free)"),
        Some(&format!("startup{n}_ns")),
        &s,
        None,
    );
    rep.note(format!("{d} dispatches meanwhile"));
    let (s, d) = startup(Startup::OneByOneSync);
    rep.add(
        S,
        format!("{n} x (register_dev + synchronize), pre-6.18"),
        Some(&format!("startup{n}_sync_ns")),
        &s,
        Some(base),
    );
    rep.note(format!("{d} dispatches meanwhile"));
    let (s, d) = startup(Startup::Many);
    rep.add(
        S,
        format!("register_many of {n}"),
        Some(&format!("startup{n}_many_ns")),
        &s,
        Some(base),
    );
    rep.note(format!("{d} dispatches meanwhile"));
}

/// The registration figures of one peer of [`peers`].
struct PeerUpdate {
    key: &'static str,
    label: &'static str,
    register_what: &'static str,
    unregister_what: &'static str,
    removal: &'static str,
    register: Stats,
    unregister: Stats,
    unregister_busy: Stats,
}

fn peer_update<P: UpdatePeer>(
    cfg: &Config,
    register_what: &'static str,
    unregister_what: &'static str,
) -> PeerUpdate {
    PeerUpdate {
        key: P::KEY,
        label: P::LABEL,
        register_what,
        unregister_what,
        removal: P::REMOVAL,
        register: peers::register_latency::<P>(cfg.register_reps, 50),
        unregister: peers::unregister_latency::<P>(cfg.unregister_reps),
        unregister_busy: peers::unregister_latency_busy::<P>(cfg.unregister_reps, 2),
    }
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn run_vm(cfg: &Config, rep: &mut Report) {
    use crate::vm;
    const G: &str = "4. Real VM: guest `out dx, al` loop (PIO exit to userspace)";
    let mut pio = match vm::PioVm::new() {
        Ok(v) => v,
        Err(e) => {
            rep.skipped.push(format!("real VM: {e}"));
            return;
        }
    };
    let tpn = crate::harness::tsc::ticks_per_ns(Duration::from_millis(20));
    let buses = vm::pio_buses::<Classic>(15);
    // Warm-up.
    if let Err(e) = vm::exits(&mut pio, Some(&buses), cfg.vm_exits / 10 + 1, tpn) {
        rep.skipped.push(format!("real VM: {e}"));
        return;
    }
    let mut with = vec![];
    let mut without = vec![];
    for _ in 0..cfg.vm_reps {
        with.push(vm::exits(&mut pio, Some(&buses), cfg.vm_exits, tpn).expect("run"));
        without.push(vm::exits::<Classic>(&mut pio, None, cfg.vm_exits, tpn).expect("run"));
    }
    let exit = rep.add(
        G,
        "time per exit, dispatched by kvm-bus (Buses::write, 16-device PIO bus)",
        Some("vm_exit_ns"),
        &Stats {
            samples: with.iter().map(|s| s.exit_ns).collect(),
        },
        None,
    );
    rep.note(format!("{} exits per sample", cfg.vm_exits));
    let d = rep.add(
        G,
        "of which kvm-bus dispatch (TSC-timed)",
        Some("vm_exit_dispatch_ns"),
        &Stats {
            samples: with.iter().map(|s| s.dispatch_ns).collect(),
        },
        Some(exit),
    );
    rep.note(format!("{:.3}% of the exit", 100.0 * d / exit));
    rep.values.insert("vm_exit_dispatch_share".into(), d / exit);
    rep.add(
        G,
        "time per exit, no dispatch (baseline)",
        Some("vm_exit_nodispatch_ns"),
        &Stats {
            samples: without.iter().map(|s| s.exit_ns).collect(),
        },
        Some(exit),
    );
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn run_vm(_cfg: &Config, rep: &mut Report) {
    rep.skipped
        .push("real VM: needs Linux x86_64 with /dev/kvm".into());
}

fn header(rep: &mut Report) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    rep.header.push(format!(
        "Machine: {cpus} CPUs ({cpu}), Linux {kernel}, {}",
        std::env::consts::ARCH
    ));
    rep.header
        .push(format!("Load average at start: {}", loadavg()));
    let c = Srcu::new();
    let f = Srcu::new_fast();
    rep.header.push(format!(
        "srcu classic: reader mode {:?}, counters {:?}; srcu fast: reader mode {:?}, counters {:?}",
        c.reader_mode(),
        c.counter_path(),
        f.reader_mode(),
        f.counter_path()
    ));
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Runs everything `cfg` asks for; `progress` gets a line per section.
pub fn run(cfg: &Config, mut progress: impl FnMut(&str)) -> Report {
    let mut rep = Report::default();
    header(&mut rep);
    progress("read sections");
    run_read(cfg, &mut rep);
    progress("grace periods");
    run_grace(cfg, &mut rep);
    progress("grace periods waiting for a reader");
    run_grace_reader(cfg, &mut rep);
    progress("bus dispatch");
    run_dispatch(cfg, &mut rep);
    progress("registration");
    run_registration(cfg, &mut rep);
    progress("real VM");
    run_vm(cfg, &mut rep);
    rep.header.push(format!(
        "Load average at end: {} (other tenants share these CPUs)",
        loadavg()
    ));
    rep
}

/// One target: `lhs <= factor * rhs` (or `>=`).
pub struct Target {
    /// Left-hand key.
    pub lhs: &'static str,
    /// Right-hand key, or `None` for an absolute bound (in ns if the key
    /// ends in `_ns`, else a count or fraction).
    pub rhs: Option<&'static str>,
    /// Factor (or the absolute bound).
    pub factor: f64,
    /// `true` for `lhs >= factor * rhs`.
    pub at_least: bool,
}

/// `lhs <= factor * rhs`.
const fn le(lhs: &'static str, rhs: &'static str, factor: f64) -> Target {
    Target {
        lhs,
        rhs: Some(rhs),
        factor,
        at_least: false,
    }
}

/// The targets of issue 6, of the later issues (rust-vmm peers, the fast
/// dispatch barrier), then those on side effects and physical floors.
pub const TARGETS: &[Target] = &[
    Target {
        lhs: "read_srcu_fast_ns",
        rhs: Some("read_crossbeam_epoch_ns"),
        factor: 0.35,
        at_least: false,
    },
    Target {
        lhs: "read_srcu_fast_ns",
        rhs: Some("read_srcu_ns"),
        factor: 0.4,
        at_least: false,
    },
    Target {
        lhs: "read_srcu_ns",
        rhs: Some("read_crossbeam_epoch_ns"),
        factor: 1.0,
        at_least: false,
    },
    Target {
        lhs: "read_srcu_ns",
        rhs: Some("read_parking_lot_rwlock_ns"),
        factor: 0.6,
        at_least: false,
    },
    Target {
        lhs: "read_srcu_2t_ns",
        rhs: Some("read_srcu_ns"),
        factor: 1.3,
        at_least: false,
    },
    Target {
        lhs: "read_srcu_2t_ns",
        rhs: Some("read_parking_lot_rwlock_2t_ns"),
        factor: 0.2,
        at_least: false,
    },
    // Dispatch against the buses real Rust VMMs ship (issue "kvm-bus speaks
    // rust-vmm", part 4): at 2 threads, <= 0.25 x every lock-based peer,
    // <= 0.8 x the ArcSwap one.
    le(
        "dispatch1_srcu_2t_ns",
        "dispatch1_vm_device_iomanager_2t_ns",
        0.25,
    ),
    le(
        "dispatch1_srcu_2t_ns",
        "dispatch1_vm_device_iomanager_mutex_2t_ns",
        0.25,
    ),
    le("dispatch1_srcu_2t_ns", "dispatch1_ch_bus_2t_ns", 0.25),
    le(
        "dispatch1_srcu_2t_ns",
        "dispatch1_rwlock_btreemap_2t_ns",
        0.25,
    ),
    le(
        "dispatch1_srcu_2t_ns",
        "dispatch1_dragonball_arcswap_2t_ns",
        0.8,
    ),
    le(
        "dispatch1_srcu_fast_2t_ns",
        "dispatch1_vm_device_iomanager_2t_ns",
        0.25,
    ),
    le(
        "dispatch1_srcu_fast_2t_ns",
        "dispatch1_vm_device_iomanager_mutex_2t_ns",
        0.25,
    ),
    le("dispatch1_srcu_fast_2t_ns", "dispatch1_ch_bus_2t_ns", 0.25),
    le(
        "dispatch1_srcu_fast_2t_ns",
        "dispatch1_rwlock_btreemap_2t_ns",
        0.25,
    ),
    le(
        "dispatch1_srcu_fast_2t_ns",
        "dispatch1_dragonball_arcswap_2t_ns",
        0.8,
    ),
    le(
        "dispatch64_srcu_2t_ns",
        "dispatch64_vm_device_iomanager_2t_ns",
        0.25,
    ),
    le(
        "dispatch64_srcu_2t_ns",
        "dispatch64_vm_device_iomanager_mutex_2t_ns",
        0.25,
    ),
    le("dispatch64_srcu_2t_ns", "dispatch64_ch_bus_2t_ns", 0.25),
    le(
        "dispatch64_srcu_2t_ns",
        "dispatch64_rwlock_btreemap_2t_ns",
        0.25,
    ),
    le(
        "dispatch64_srcu_2t_ns",
        "dispatch64_dragonball_arcswap_2t_ns",
        0.8,
    ),
    le(
        "dispatch64_srcu_fast_2t_ns",
        "dispatch64_vm_device_iomanager_2t_ns",
        0.25,
    ),
    le(
        "dispatch64_srcu_fast_2t_ns",
        "dispatch64_vm_device_iomanager_mutex_2t_ns",
        0.25,
    ),
    le(
        "dispatch64_srcu_fast_2t_ns",
        "dispatch64_ch_bus_2t_ns",
        0.25,
    ),
    le(
        "dispatch64_srcu_fast_2t_ns",
        "dispatch64_rwlock_btreemap_2t_ns",
        0.25,
    ),
    le(
        "dispatch64_srcu_fast_2t_ns",
        "dispatch64_dragonball_arcswap_2t_ns",
        0.8,
    ),
    // The fast flavor's dispatch barrier is an acquire fence (issue
    // "Performance at the floor", part 2): fast <= 0.75 x classic.
    le("dispatch1_srcu_fast_ns", "dispatch1_srcu_ns", 0.75),
    le("dispatch1_srcu_fast_2t_ns", "dispatch1_srcu_2t_ns", 0.75),
    le("dispatch64_srcu_fast_ns", "dispatch64_srcu_ns", 0.75),
    le("dispatch64_srcu_fast_2t_ns", "dispatch64_srcu_2t_ns", 0.75),
    Target {
        lhs: "vm_exit_dispatch_ns",
        rhs: Some("vm_exit_ns"),
        factor: 0.01,
        at_least: false,
    },
    Target {
        lhs: "register_ns",
        rhs: Some("kernel_ioeventfd_register_ns"),
        factor: 0.5,
        at_least: false,
    },
    Target {
        lhs: "startup200_sync_ns",
        rhs: Some("startup200_ns"),
        factor: 5.0,
        at_least: true,
    },
    Target {
        lhs: "synchronize_idle_ns",
        rhs: None,
        factor: 2000.0,
        at_least: false,
    },
    Target {
        lhs: "unregister_ns",
        rhs: Some("kernel_ioeventfd_unregister_ns"),
        factor: 0.01,
        at_least: false,
    },
    // The same target with a vCPU running the guest loop on both sides
    // (kvm-bus: the vCPU dispatches every exit on the buses being updated).
    Target {
        lhs: "unregister_vcpu_ns",
        rhs: Some("kernel_ioeventfd_unregister_vcpu_ns"),
        factor: 0.01,
        at_least: false,
    },
    // Physical floors: the fast read section against its two bare rseq
    // adds, an idle fast grace period against one bare membarrier.
    // Issue "Performance at the floor", part 1: at 1 and 2 threads, the
    // fast section <= 1.3 x its floor and <= 0.3 x crossbeam's pin.
    le("read_srcu_fast_ns", "read_rseq_pair_floor_ns", 1.3),
    le("read_srcu_fast_2t_ns", "read_rseq_pair_floor_2t_ns", 1.3),
    le("read_srcu_fast_ns", "read_crossbeam_epoch_ns", 0.3),
    le("read_srcu_fast_2t_ns", "read_crossbeam_epoch_2t_ns", 0.3),
    // Part 4: ahead of RwLock<BTreeMap> on a 1000-device bus.
    le(
        "dispatch1000_srcu_ns",
        "dispatch1000_rwlock_btreemap_ns",
        0.7,
    ),
    le(
        "dispatch1000_srcu_fast_ns",
        "dispatch1000_rwlock_btreemap_ns",
        0.7,
    ),
    Target {
        lhs: "synchronize_fast_idle_ns",
        rhs: Some("membarrier_call_ns"),
        factor: 4.0,
        at_least: false,
    },
    // Side effects (srcu.stats() deltas of the timed calls).
    Target {
        lhs: "membarriers_per_idle_gp_fast",
        rhs: None,
        factor: 3.0,
        at_least: false,
    },
    Target {
        lhs: "membarriers_per_idle_gp_expedited_fast",
        rhs: None,
        factor: 3.0,
        at_least: false,
    },
    Target {
        lhs: "membarriers_per_gp_reader200ms_fast",
        rhs: None,
        factor: 36.0,
        at_least: false,
    },
    Target {
        lhs: "membarriers_per_gp_reader200ms_expedited_fast",
        rhs: None,
        factor: 36.0,
        at_least: false,
    },
    Target {
        lhs: "wait_cpu_frac_reader200ms_fast",
        rhs: None,
        factor: 0.05,
        at_least: false,
    },
    Target {
        lhs: "wait_cpu_frac_reader200ms_expedited_fast",
        rhs: None,
        factor: 0.05,
        at_least: false,
    },
    Target {
        lhs: "wait_cpu_frac_reader200ms_classic",
        rhs: None,
        factor: 0.05,
        at_least: false,
    },
    Target {
        lhs: "wait_cpu_frac_reader200ms_expedited_classic",
        rhs: None,
        factor: 0.05,
        at_least: false,
    },
];

/// A value for the targets table: ns for `_ns` keys, else a plain number.
fn fmt_value(key: &str, v: f64) -> String {
    if key.ends_with("_ns") {
        fmt_ns(v)
    } else if !v.is_finite() {
        "n/a".into()
    } else {
        format!("{v:.3}")
    }
}

/// Evaluates one target: `Some((pass, measured ratio or value))`, or
/// `None` if a key is missing (e.g. no `/dev/kvm`).
pub fn evaluate(rep: &Report, t: &Target) -> Option<(bool, f64)> {
    let l = rep.get(t.lhs).filter(|v| v.is_finite())?;
    let (v, bound) = match t.rhs {
        Some(r) => (l / rep.get(r).filter(|v| v.is_finite())?, t.factor),
        None => (l, t.factor),
    };
    Some((if t.at_least { v >= bound } else { v <= bound }, v))
}

/// The best ratio a target on the fast flavor could reach in this run if
/// the fast read side cost no more than its floor, and what that is made
/// of: a fast read section costs at least its floor (two bare rseq adds),
/// and a fast dispatch at least the same table dispatched with no
/// synchronisation plus that floor. The floor is taken as the lower of the
/// floor row and the fast section without its tracking (a noisy host can
/// time the latter lower, though it does more), so the bound errs low.
/// `None` for targets on other rows, against the floor itself, or where a
/// figure is missing.
pub fn floor_bound(rep: &Report, t: &Target) -> Option<(f64, &'static str)> {
    if t.at_least {
        return None;
    }
    let finite = |k: &str| rep.get(k).filter(|v| v.is_finite() && *v > 0.0);
    let rhs_key = t.rhs?;
    let rhs = finite(rhs_key)?;
    let sfx = if t.lhs.ends_with("_2t_ns") { "_2t" } else { "" };
    let floor_key = format!("read_rseq_pair_floor{sfx}_ns");
    if rhs_key == floor_key {
        return None;
    }
    let floor = match (
        finite(&floor_key),
        finite(&format!("read_srcu_fast_untracked{sfx}_ns")),
    ) {
        (Some(f), Some(u)) => f.min(u),
        (f, u) => f.or(u)?,
    };
    if t.lhs == format!("read_srcu_fast{sfx}_ns") {
        return Some((floor / rhs, "a section at the floor"));
    }
    let n = t
        .lhs
        .strip_prefix("dispatch")?
        .strip_suffix(&format!("_srcu_fast{sfx}_ns"))?;
    let table = finite(&format!("dispatch{n}_bare_table{sfx}_ns"))?;
    Some(((table + floor) / rhs, "the table alone + the floor"))
}

impl Report {
    /// The markdown table and the targets.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        for h in &self.header {
            let _ = writeln!(s, "{h}  ");
        }
        let _ = writeln!(
            s,
            "\nEach figure is the median of `reps` samples. A 1-thread sample of a \
             sub-microsecond operation is the thread-CPU time of a batch divided by its \
             length (time descheduled by other tenants excluded); a 2-thread sample is \
             a ~100 µs window of one thread, out of fixed spans run by both threads at \
             once, in which both threads were on a CPU throughout: its wall-clock time divided \
             by that thread's operations in it (per-thread cost while they really run at once; \
             `reps` counts such windows; windows in which another tenant descheduled either \
             thread are left out, and the note gives the whole-span figure). Everything else is wall-clock time per \
             call. \"x srcu\" is this row divided by the srcu row of the same comparison. \
             Grace-period notes (membarriers per GP, scans, waits and the CPU they burnt) are \
             `srcu.stats()` deltas over exactly the timed calls of the row; rows marked (ref) \
             are physical floors (a bare `membarrier`, srcu fast's two bare rseq adds).\n"
        );
        let mut group = "";
        for r in &self.rows {
            if r.group != group {
                group = r.group;
                let _ = writeln!(s, "\n### {group}\n");
                let _ = writeln!(
                    s,
                    "| benchmark | median | x srcu | reps | min .. max | key | note |"
                );
                let _ = writeln!(s, "|---|---:|---:|---:|---:|---|---|");
            }
            let ratio = match r.baseline {
                Some(b) if b.is_finite() && b > 0.0 && r.ns.is_finite() => {
                    format!("{:.2}", r.ns / b)
                }
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} .. {} | {} | {} |",
                r.name,
                fmt_ns(r.ns),
                ratio,
                r.reps,
                fmt_ns(r.min_max.0),
                fmt_ns(r.min_max.1),
                r.key
                    .as_deref()
                    .map(|k| format!("`{k}`"))
                    .unwrap_or_default(),
                r.note
            );
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(s, "\nSkipped:");
            for k in &self.skipped {
                let _ = writeln!(s, "- {k}");
            }
        }
        let _ = writeln!(
            s,
            "\n### Targets (issue 6; rust-vmm peers; fast dispatch; floors; side effects)\n"
        );
        if let Some(bare) = self.get("dispatch64_bare_table_ns") {
            // The host's phase, for reading the ratios below (README,
            // "Performance"): the table work alone, no synchronisation.
            let _ = writeln!(
                s,
                "Host phase: the 64-device table dispatched alone took {bare:.2} ns in this run \
                 (4.4-4.9 ns in the quiet phases of the 2-vCPU hosts these reports come from, \
                 9.4-10.7 ns in the busy ones, where throughput-bound code loses most: the fast \
                 flavor's ratios to classic and to its floor rise).\n"
            );
        }
        let _ = writeln!(
            s,
            "\"Best here\": for a target on the fast flavor, the ratio it would reach in \
             this run if the fast read side cost no more than its floor (a section at the \
             floor, two bare rseq adds, or at the untracked section if that timed lower; a \
             dispatch at the table alone plus that floor). \"Above the target even at the \
             floor\": the target asks for less than the floor measured in this run.\n"
        );
        let _ = writeln!(s, "| target | measured | result | best here |");
        let _ = writeln!(s, "|---|---:|---|---|");
        for t in TARGETS {
            let op = if t.at_least { ">=" } else { "<=" };
            let text = match t.rhs {
                Some(r) => format!("`{}` {op} {} x `{r}`", t.lhs, t.factor),
                None => format!("`{}` {op} {}", t.lhs, fmt_value(t.lhs, t.factor)),
            };
            let (m, res) = match evaluate(self, t) {
                Some((pass, v)) => (
                    if t.rhs.is_some() {
                        format!("{v:.3} x")
                    } else {
                        fmt_value(t.lhs, v)
                    },
                    if pass { "PASS" } else { "MISS" },
                ),
                None => (
                    "n/a".into(),
                    "not measured (no /dev/kvm, membarrier or rseq, or no window with both \
                     threads on a CPU)",
                ),
            };
            let best = floor_bound(self, t).map_or(String::new(), |(b, what)| {
                let reach = if b > t.factor {
                    ": above the target even at the floor"
                } else {
                    ""
                };
                format!("{b:.3} x ({what}{reach})")
            });
            let _ = writeln!(s, "| {text} | {m} | {res} | {best} |");
        }
        s
    }

    /// The flat JSON object.
    pub fn json(&self) -> String {
        let mut s = String::from("{\n");
        let n = self.values.len();
        for (i, (k, v)) in self.values.iter().enumerate() {
            let v = if !v.is_finite() {
                "null".into()
            } else if k.ends_with("_ns") {
                format!("{v:.3}")
            } else {
                // Counts per grace period, fractions, shares.
                format!("{v:.6}")
            };
            let _ = writeln!(s, "  \"{k}\": {v}{}", if i + 1 < n { "," } else { "" });
        }
        s.push('}');
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The "best here" bound of the targets on the fast flavor: the floor
    /// over the right-hand side for a read section, the table alone plus
    /// the floor for a dispatch (against any peer), the untracked section
    /// in place of the floor when it timed lower, nothing for targets on
    /// other rows or against the floor itself.
    #[test]
    fn floor_bound_of_the_fast_targets() {
        fn bound(
            rep: &Report,
            lhs: &'static str,
            rhs: &'static str,
        ) -> Option<(f64, &'static str)> {
            floor_bound(rep, &le(lhs, rhs, 0.3))
        }
        let mut rep = Report::default();
        for (k, v) in [
            ("read_rseq_pair_floor_ns", 2.0),
            ("read_srcu_fast_untracked_ns", 2.5),
            ("read_crossbeam_epoch_ns", 5.0),
            ("read_srcu_ns", 4.0),
            ("read_srcu_fast_ns", 2.6),
            ("read_rseq_pair_floor_2t_ns", 3.0),
            ("read_crossbeam_epoch_2t_ns", 12.0),
            ("dispatch1_bare_table_ns", 9.0),
            ("dispatch1_srcu_ns", 13.0),
            ("dispatch1_srcu_fast_ns", 13.5),
            ("dispatch1_dragonball_arcswap_2t_ns", 20.0),
            ("dispatch1_bare_table_2t_ns", f64::NAN),
        ] {
            rep.values.insert(k.into(), v);
        }
        let at_floor = "a section at the floor";
        let table = "the table alone + the floor";
        assert_eq!(
            bound(&rep, "read_srcu_fast_ns", "read_crossbeam_epoch_ns"),
            Some((0.4, at_floor))
        );
        assert_eq!(
            bound(&rep, "read_srcu_fast_2t_ns", "read_crossbeam_epoch_2t_ns"),
            Some((0.25, at_floor))
        );
        assert_eq!(
            bound(&rep, "read_srcu_fast_ns", "read_srcu_ns"),
            Some((0.5, at_floor))
        );
        assert_eq!(
            bound(&rep, "dispatch1_srcu_fast_ns", "dispatch1_srcu_ns"),
            Some((11.0 / 13.0, table))
        );
        // Against another peer too; a NaN table (a 2-thread row without a
        // window) gives none.
        rep.values
            .insert("dispatch1_rwlock_btreemap_ns".into(), 22.0);
        assert_eq!(
            bound(
                &rep,
                "dispatch1_srcu_fast_ns",
                "dispatch1_rwlock_btreemap_ns"
            ),
            Some((0.5, table))
        );
        assert!(bound(
            &rep,
            "dispatch1_srcu_fast_2t_ns",
            "dispatch1_dragonball_arcswap_2t_ns"
        )
        .is_none());
        // Against the floor itself, for classic's rows, or a missing peer: none.
        assert!(bound(&rep, "read_srcu_fast_ns", "read_rseq_pair_floor_ns").is_none());
        assert!(bound(&rep, "read_srcu_ns", "read_crossbeam_epoch_ns").is_none());
        assert!(bound(&rep, "dispatch1_srcu_ns", "dispatch1_rwlock_btreemap_ns").is_none());
        assert!(bound(&rep, "dispatch64_srcu_fast_ns", "dispatch64_srcu_ns").is_none());
        // The untracked section timed below the floor: it is the floor.
        rep.values.insert("read_srcu_fast_untracked_ns".into(), 1.5);
        assert_eq!(
            bound(&rep, "read_srcu_fast_ns", "read_crossbeam_epoch_ns"),
            Some((0.3, at_floor))
        );
        // Without either there is no bound.
        rep.values.remove("read_srcu_fast_untracked_ns");
        rep.values.remove("read_rseq_pair_floor_ns");
        assert!(bound(&rep, "read_srcu_fast_ns", "read_crossbeam_epoch_ns").is_none());
        // The markdown says when a target asks for less than the floor.
        rep.values.insert("read_rseq_pair_floor_ns".into(), 2.0);
        assert!(rep
            .markdown()
            .contains("0.400 x (a section at the floor: above the target even at the floor)"));
    }

    /// Every measurement once, at a tiny size, so nothing rots.
    #[test]
    fn every_measurement_runs_once() {
        let t0 = std::time::Instant::now();
        let rep = run(&Config::tiny(), |_| {});
        let fast = Srcu::new_fast();
        let membarrier = fast.reader_mode() == ReaderMode::Membarrier;
        let rseq = fast.counter_path() == srcu::CounterPath::Rseq;
        for key in [
            "read_srcu_ns",
            "read_srcu_fast_ns",
            "read_parking_lot_rwlock_ns",
            "read_std_rwlock_ns",
            "read_crossbeam_epoch_ns",
            "read_arc_swap_ns",
            "read_srcu_2t_ns",
            "read_srcu_fast_2t_ns",
            "read_parking_lot_rwlock_2t_ns",
            "read_std_rwlock_2t_ns",
            "read_crossbeam_epoch_2t_ns",
            "read_arc_swap_2t_ns",
            "synchronize_idle_ns",
            "synchronize_fast_idle_ns",
            "synchronize_busy_ns",
            "dispatch64_srcu_ns",
            "dispatch64_rwlock_btreemap_ns",
            "dispatch64_srcu_2t_ns",
            "dispatch64_rwlock_btreemap_2t_ns",
            "dispatch1_vm_device_iomanager_2t_ns",
            "dispatch64_vm_device_iomanager_ns",
            "dispatch64_vm_device_iomanager_mutex_2t_ns",
            "dispatch64_ch_bus_ns",
            "dispatch64_ch_bus_2t_ns",
            "dispatch64_dragonball_arcswap_ns",
            "dispatch64_dragonball_arcswap_2t_ns",
            "dispatch64_dragonball_cache_ns",
            "register_ns",
            "register_fast_ns",
            "register_sync_ns",
            "register_vm_device_iomanager_ns",
            "register_ch_bus_ns",
            "register_dragonball_arcswap_ns",
            "unregister_ns",
            "unregister_vm_device_iomanager_ns",
            "unregister_ch_bus_ns",
            "unregister_dragonball_arcswap_ns",
            "unregister_busy_vm_device_iomanager_ns",
            "unregister_busy_ch_bus_ns",
            "unregister_busy_dragonball_arcswap_ns",
            "move_range_ns",
            "move_range_fast_ns",
            "start_unregister_ns",
            "start_unregister_fast_ns",
            "removal_complete_ns",
            "removal_complete_fast_ns",
            "startup20_ns",
            "startup20_sync_ns",
            "synchronize_reader200ms_classic_ns",
            "synchronize_reader200ms_fast_ns",
            "synchronize_expedited_reader200ms_classic_ns",
            "synchronize_expedited_reader200ms_fast_ns",
        ]
        .into_iter()
        .chain(
            membarrier
                .then_some([
                    "membarrier_call_ns",
                    "membarriers_per_idle_gp_fast",
                    "membarriers_per_idle_gp_expedited_fast",
                    "membarriers_per_gp_reader200ms_fast",
                    "membarriers_per_gp_reader200ms_expedited_fast",
                ])
                .into_iter()
                .flatten(),
        )
        .chain(rseq.then_some("read_rseq_pair_floor_ns"))
        {
            let v = rep.get(key).unwrap_or_else(|| panic!("missing {key}"));
            if key.contains("_2t") {
                // At this size a 2-thread row may have no window with both
                // threads on a CPU (NaN); the whole-span figure always exists.
                let wall = key.replace("_ns", "_wall_ns");
                let w = rep.get(&wall).unwrap_or_else(|| panic!("missing {wall}"));
                assert!(w.is_finite() && w > 0.0, "{wall} = {w}");
                continue;
            }
            assert!(v.is_finite() && v > 0.0, "{key} = {v}");
        }
        // CPU fractions of a wait may be 0 (a coarse CPU clock), never
        // negative or missing.
        for key in [
            "wait_cpu_frac_reader200ms_fast",
            "wait_cpu_frac_reader200ms_classic",
            "wait_cpu_frac_reader200ms_expedited_fast",
            "wait_cpu_frac_reader200ms_expedited_classic",
            "caller_cpu_frac_reader200ms_fast",
            "caller_cpu_frac_reader200ms_classic",
            "caller_cpu_frac_reader200ms_expedited_fast",
            "caller_cpu_frac_reader200ms_expedited_classic",
        ] {
            let v = rep.get(key).unwrap_or_else(|| panic!("missing {key}"));
            assert!(v.is_finite() && v >= 0.0, "{key} = {v}");
        }
        // Every dispatch target names keys the run produces.
        for t in TARGETS.iter().filter(|t| t.lhs.starts_with("dispatch")) {
            for k in [Some(t.lhs), t.rhs].into_iter().flatten() {
                assert!(rep.values.contains_key(k), "target key {k} not produced");
            }
        }
        let md = rep.markdown();
        assert!(md.contains("### Targets"));
        assert!(rep.json().contains("\"read_srcu_ns\": "));
        eprintln!("tiny report took {:?}", t0.elapsed());
    }
}
