// A reader's guard cannot stand in for the slots lock.
use kvm_bus::{BusKind, Buses};

fn main() {
    let buses = Buses::new();
    let guard = buses.read_lock();
    let _bus = buses.get_bus(&guard, BusKind::Mmio);
}
