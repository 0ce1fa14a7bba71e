//! Issue 6, section 4: a real VM (`/dev/kvm`) whose guest loops on a PIO
//! write; time per exit with kvm-bus dispatch, without dispatch, and the
//! dispatch part alone (TSC-timed). Skipped without a usable `/dev/kvm`.

use criterion::{criterion_group, criterion_main, Criterion};
use std::time::Duration;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn vm_exits(c: &mut Criterion) {
    use benches::vm;
    use srcu::Classic;
    let mut pio = match vm::PioVm::new() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("skipping VM benches: {e}");
            return;
        }
    };
    let tpn = benches::harness::tsc::ticks_per_ns(Duration::from_millis(20));
    let buses = vm::pio_buses::<Classic>(15);
    let mut g = c.benchmark_group("vm_pio_exit");
    g.bench_function("with_kvm_bus_dispatch", |b| {
        b.iter_custom(|iters| {
            let s = vm::exits(&mut pio, Some(&buses), iters, tpn).expect("KVM_RUN");
            Duration::from_nanos((s.exit_ns * iters as f64) as u64)
        })
    });
    g.bench_function("dispatch_part_only", |b| {
        b.iter_custom(|iters| {
            let s = vm::exits(&mut pio, Some(&buses), iters, tpn).expect("KVM_RUN");
            Duration::from_nanos((s.dispatch_ns * iters as f64) as u64)
        })
    });
    g.bench_function("no_dispatch", |b| {
        b.iter_custom(|iters| {
            let s = vm::exits::<Classic>(&mut pio, None, iters, tpn).expect("KVM_RUN");
            Duration::from_nanos((s.exit_ns * iters as f64) as u64)
        })
    });
    g.finish();
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn vm_exits(_c: &mut Criterion) {
    eprintln!("skipping VM benches: Linux x86_64 only");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = vm_exits
}
criterion_main!(benches);
