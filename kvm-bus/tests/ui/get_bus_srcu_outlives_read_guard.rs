// A bus reference from the read path cannot outlive the read section.
use kvm_bus::{BusKind, Buses, IoBus};

fn main() {
    let buses = Buses::new();
    let bus: &IoBus = {
        let guard = buses.read_lock();
        buses.get_bus_srcu(&guard, BusKind::Pio)
    };
    println!("{}", bus.len());
}
