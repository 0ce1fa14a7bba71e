// Teardown hands out `&IoBus`, never `&mut IoBus`: a table cannot be moved
// out of (or swapped between) `Buses`, whose registries back its devices.
use kvm_bus::{BusKind, Buses};

fn main() {
    let mut a = Buses::new();
    let taken = std::mem::take(a.get_bus_for_destruction(BusKind::Pio));
    drop(a);
    let _ = taken.get_dev(0);
}
