// A bus reference from the update side cannot outlive the slots lock.
use kvm_bus::{BusKind, Buses};

fn main() {
    let buses = Buses::new();
    let slots = buses.lock_slots();
    let bus = buses.get_bus(&slots, BusKind::Mmio);
    drop(slots);
    println!("{}", bus.len());
}
