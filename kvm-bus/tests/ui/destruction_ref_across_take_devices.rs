// A bus reference from `get_bus_for_destruction` cannot be kept across
// `take_devices`, which empties the bus (and frees the old table at once).
use kvm_bus::{BusKind, Buses};

fn main() {
    let mut buses = Buses::new();
    let bus = buses.get_bus_for_destruction(BusKind::Pio);
    let devices = buses.take_devices(BusKind::Pio);
    println!("{} {}", devices.len(), bus.len()); // LATER USE
}
