//! Issue 6, section 2: grace periods, both flavors.

use benches::grace;
use benches::harness::with_background;
use criterion::{criterion_group, criterion_main, Criterion};
use srcu::{Classic, Fast, Flavor, Srcu};
use std::hint::black_box;
use std::time::{Duration, Instant};

fn flavor<F: Flavor>(c: &mut Criterion) {
    let srcu: Srcu<F> = grace::domain::<F>();
    let name = F::NAME;
    let mut g = c.benchmark_group(format!("grace_{name}"));
    g.bench_function("synchronize_idle", |b| b.iter(|| srcu.synchronize()));
    g.bench_function("synchronize_expedited_idle", |b| {
        b.iter(|| srcu.synchronize_expedited())
    });
    for (id, exp) in [
        ("synchronize_2_readers", false),
        ("synchronize_expedited_2_readers", true),
    ] {
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
    }
    g.finish();
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
