// A bus reference from `get_bus` cannot be kept across a `register_many`
// under the same slots guard.
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
    let bus = buses.get_bus(&slots, BusKind::Mmio);
    let dev: Arc<dyn IoDevice> = Arc::new(Sink);
    let batch = [(IoRange::new(0x1000, 4).unwrap(), dev)];
    buses.register_many(&mut slots, BusKind::Mmio, batch).unwrap();
    println!("{}", bus.len()); // LATER USE
}
