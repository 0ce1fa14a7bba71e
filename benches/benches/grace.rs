//! Issue 6, section 2: grace periods, both flavors.
//!
//! Besides criterion's timings, every group prints what its grace periods
//! cost besides time, from `srcu.stats()` deltas taken around the very
//! benchmark that was timed: `membarrier` calls per grace period, and for
//! waiting grace periods the CPU the waiting thread burnt. One grace period
//! against a reader sleeping in a 200 ms section (20 ms in test mode) is
//! measured once per kind and printed the same way (too long a sample for
//! criterion). `grace_fast/membarrier_call` is the floor a fast grace
//! period is made of.

use benches::grace;
use benches::harness::with_background;
use criterion::{criterion_group, criterion_main, Criterion};
use srcu::{Classic, Fast, Flavor, ReaderMode, Srcu, SrcuStats};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// One line on stderr: the side effects of benchmark `id`.
fn side_effects<F: Flavor>(srcu: &Srcu<F>, id: &str, d: &SrcuStats) {
    let per = |n: u64| n as f64 / d.grace_periods.max(1) as f64;
    let mut line = format!("grace_{}/{id}: {} grace periods", F::NAME, d.grace_periods);
    if srcu.reader_mode() == ReaderMode::Membarrier {
        line += &format!(", {:.2} membarriers per GP", per(d.membarriers));
    }
    if d.waits > 0 {
        line += &format!(
            ", {} waits: {:.1} ms wall, {:.2} ms CPU ({:.2}%)",
            d.waits,
            d.wait_wall_ns as f64 / 1e6,
            d.wait_cpu_ns as f64 / 1e6,
            100.0 * d.wait_cpu_ns as f64 / d.wait_wall_ns.max(1) as f64
        );
    }
    eprintln!("{line}");
}

fn flavor<F: Flavor>(c: &mut Criterion) {
    let srcu: Srcu<F> = grace::domain::<F>();
    let name = F::NAME;
    let mut g = c.benchmark_group(format!("grace_{name}"));
    let ((), d) = grace::with_stats(&srcu, || {
        g.bench_function("synchronize_idle", |b| b.iter(|| srcu.synchronize()));
    });
    side_effects(&srcu, "synchronize_idle", &d);
    let ((), d) = grace::with_stats(&srcu, || {
        g.bench_function("synchronize_expedited_idle", |b| {
            b.iter(|| srcu.synchronize_expedited())
        });
    });
    side_effects(&srcu, "synchronize_expedited_idle", &d);
    if F::FAST && grace::membarrier::available() {
        g.bench_function("membarrier_call", |b| {
            b.iter(grace::membarrier::private_expedited)
        });
    }
    for (id, exp) in [
        ("synchronize_2_readers", false),
        ("synchronize_expedited_2_readers", true),
    ] {
        let ((), d) = grace::with_stats(&srcu, || {
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    with_background(
                        2,
                        || drop(black_box(srcu.read_lock())),
                        || {
                            let t0 = Instant::now();
                            for _ in 0..iters {
                                if exp {
                                    srcu.synchronize_expedited()
                                } else {
                                    srcu.synchronize()
                                }
                            }
                            t0.elapsed()
                        },
                    )
                    .0
                })
            });
        });
        side_effects(&srcu, id, &d);
    }
    g.bench_function("call_srcu_enqueue", |b| {
        b.iter_custom(|iters| {
            let t0 = Instant::now();
            for i in 0..iters {
                let v = Box::new(i);
                srcu.call_srcu(move || drop(black_box(v)));
            }
            let t = t0.elapsed();
            srcu.barrier();
            t
        })
    });
    g.bench_function("call_srcu_until_barrier", |b| {
        b.iter_custom(|iters| {
            let t0 = Instant::now();
            for i in 0..iters {
                let v = Box::new(i);
                srcu.call_srcu(move || drop(black_box(v)));
            }
            srcu.barrier();
            t0.elapsed()
        })
    });
    g.finish();
    let burst = grace::call_srcu_burst(&srcu, 100_000);
    eprintln!(
        "grace_{name}: a burst of 100000 call_srcu retired {:.0} callbacks per grace period",
        burst.per_gp
    );

    let mut g = c.benchmark_group(format!("grace_{name}_1ms_section"));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(2));
    for (id, exp) in [("synchronize", false), ("synchronize_expedited", true)] {
        let ((), d) = grace::with_stats(&srcu, || {
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let s = grace::synchronize_long_section(
                        &srcu,
                        Duration::from_millis(1),
                        iters as usize,
                        exp,
                    );
                    Duration::from_nanos(s.samples.iter().sum::<f64>() as u64)
                })
            });
        });
        side_effects(&srcu, &format!("1ms_section/{id}"), &d);
    }
    g.finish();

    // `cargo bench` passes `--bench`; `cargo test` runs this in test mode.
    let section = if std::env::args().any(|a| a == "--bench") {
        Duration::from_millis(200)
    } else {
        Duration::from_millis(20)
    };
    let ms = section.as_millis();
    for (id, exp) in [("synchronize", false), ("synchronize_expedited", true)] {
        let w = grace::against_reader(&srcu, section, exp);
        side_effects(&srcu, &format!("reader{ms}ms/{id}"), &w.delta);
        eprintln!(
            "grace_{name}/reader{ms}ms/{id}: {:.3} ms; wait CPU {:.3}% of the wait beyond \
             100 µs (stats), caller CPU {:.3}% (clock_gettime); returned {:.0} µs after the \
             reader left",
            w.latency_ns / 1e6,
            100.0 * w.wait_cpu_frac(),
            100.0 * w.caller_cpu_frac(),
            w.overshoot_ns / 1e3
        );
    }
}

fn grace_periods(c: &mut Criterion) {
    flavor::<Classic>(c);
    flavor::<Fast>(c);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = grace_periods
}
criterion_main!(benches);
