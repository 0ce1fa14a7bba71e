//! A quick look at a domain: which paths are active, what a read section and
//! an idle grace period cost on this machine.
use srcu::{Fast, Srcu};
use std::time::Instant;

fn main() {
    let classic = Srcu::new();
    let fast: Srcu<Fast> = Srcu::new_fast();
    println!("classic: {classic:?}");
    println!("fast:    {fast:?}");
    const N: u32 = 10_000_000;
    let t = Instant::now();
    for _ in 0..N {
        drop(std::hint::black_box(classic.read_lock()));
    }
    println!(
        "classic read_lock+unlock: {:.2} ns",
        t.elapsed().as_nanos() as f64 / N as f64
    );
    let t = Instant::now();
    for _ in 0..N {
        drop(std::hint::black_box(fast.read_lock()));
    }
    println!(
        "fast    read_lock+unlock: {:.2} ns",
        t.elapsed().as_nanos() as f64 / N as f64
    );
    let runs: [(&str, &dyn Fn()); 2] = [
        ("classic", &|| classic.synchronize()),
        ("fast", &|| fast.synchronize()),
    ];
    for (name, f) in runs {
        let t = Instant::now();
        for _ in 0..1000 {
            f();
        }
        println!(
            "{name} synchronize (idle): {:.2} us",
            t.elapsed().as_nanos() as f64 / 1000.0 / 1000.0
        );
    }
    assert_eq!(classic.readers(), 0);
    assert_eq!(fast.readers(), 0);
}
