// A ReadGuard is counted on the thread that holds it; moving it to another
// thread needs `into_sendable` (and `adopt` there).
fn main() {
    let srcu = srcu::Srcu::new();
    let g = srcu.read_lock();
    std::thread::scope(|s| {
        s.spawn(move || drop(g));
    });
}
