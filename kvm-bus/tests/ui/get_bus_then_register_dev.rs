// A bus reference from `get_bus` cannot be kept across a `register_dev`
// under the same slots guard: the update publishes a new table and hands
// the old one (the one `bus` points to) to its deferred free.
use kvm_bus::{Access, BusKind, Buses, Declined, WriteResult, IoDevice, IoRange};
use std::sync::Arc;

struct Sink;
impl IoDevice for Sink {
    fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
}

fn main() {
    let buses = Buses::new();
    let mut slots = buses.lock_slots();
    let bus = buses.get_bus(&slots, BusKind::Pio);
    let range = IoRange::new(0x60, 1).unwrap();
    buses.register_dev(&mut slots, BusKind::Pio, range, Arc::new(Sink)).unwrap();
    println!("{}", bus.len()); // LATER USE
}
