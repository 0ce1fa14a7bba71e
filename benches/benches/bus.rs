//! Issue 6, section 3: dispatch on buses of 1/16/64/1000 devices (kvm-bus
//! vs `RwLock<BTreeMap>` and `Mutex<BTreeMap>`, 1 and 2 threads),
//! registration and unregistration (kvm-bus vs the pre-6.18 variant vs the
//! kernel's `KVM_IOEVENTFD`), and the 200-device "VM start-up".

use benches::bus::{self, BusVisitor, DispatchBus, RegisterMode, Startup};
use benches::harness::{concurrent_fixed, Stats};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use srcu::Classic;
use std::hint::black_box;
use std::time::Duration;

fn total(s: &Stats) -> Duration {
    Duration::from_nanos(s.samples.iter().sum::<f64>() as u64)
}

struct Visit<'a> {
    c: &'a mut Criterion,
    n: usize,
}

impl BusVisitor for Visit<'_> {
    fn visit<B: DispatchBus>(&mut self) {
        let n = self.n;
        let bus = B::with_devices(n);
        let addr = bus::target(n);
        let data = [1u8, 2, 3, 4];
        assert!(bus.dispatch(addr, &data));
        let mut g = self.c.benchmark_group(format!("dispatch_{n}"));
        g.bench_function(BenchmarkId::new("1t", B::KEY), |b| {
            b.iter(|| bus.dispatch(black_box(addr), &data))
        });
        g.bench_function(BenchmarkId::new("2t", B::KEY), |b| {
            b.iter_custom(|iters| {
                concurrent_fixed(2, iters, || {
                    black_box(bus.dispatch(black_box(addr), &data));
                })
            })
        });
        g.finish();
    }
}

fn dispatch(c: &mut Criterion) {
    for n in bus::SIZES {
        bus::for_each_bus(&mut Visit { c, n });
    }
}

fn registration(c: &mut Criterion) {
    let buses = kvm_bus::Buses::new();
    let mut g = c.benchmark_group("register");
    for (name, mode) in [
        ("register_dev", RegisterMode::Deferred),
        ("register_dev_sync_inside", RegisterMode::SyncInside),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| total(&bus::register_latency(&buses, mode, iters as usize, 50)))
        });
    }
    g.bench_function("unregister_dev", |b| {
        b.iter_custom(|iters| total(&bus::unregister_latency(&buses, iters as usize)))
    });
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    match benches::vm::IoeventVm::new() {
        Ok(vm) => {
            g.bench_function("kernel_ioeventfd_assign", |b| {
                b.iter_custom(|iters| total(&vm.register_unregister(iters as usize).0))
            });
            g.bench_function("kernel_ioeventfd_deassign", |b| {
                b.iter_custom(|iters| total(&vm.register_unregister(iters as usize).1))
            });
        }
        Err(e) => eprintln!("skipping kernel KVM_IOEVENTFD benches: {e}"),
    }
    g.finish();

    let mut g = c.benchmark_group("register_200");
    g.sample_size(10);
    g.bench_function("unregister_many", |b| {
        b.iter_custom(|iters| total(&bus::unregister_many_latency(&buses, 200, iters as usize)))
    });
    for (id, how) in [
        ("startup_one_by_one", Startup::OneByOne),
        ("startup_one_by_one_sync", Startup::OneByOneSync),
        ("startup_register_many", Startup::Many),
    ] {
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let ns: f64 = (0..iters)
                    .map(|_| bus::startup::<Classic>(how, 200, 2).0)
                    .sum();
                Duration::from_nanos(ns as u64)
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = dispatch, registration
}
criterion_main!(benches);
