// Teardown access needs `&mut Buses`: not while a reader holds a section.
use kvm_bus::{BusKind, Buses};

fn main() {
    let mut buses = Buses::new();
    let guard = buses.read_lock();
    let _ = buses.get_bus_for_destruction(BusKind::Pio).is_empty();
    drop(guard);
}
