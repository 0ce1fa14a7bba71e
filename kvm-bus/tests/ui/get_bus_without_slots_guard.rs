// `get_bus` needs the proof that the slots lock is held.
use kvm_bus::{BusKind, Buses};

fn main() {
    let buses = Buses::new();
    let _bus = buses.get_bus(BusKind::Mmio);
}
