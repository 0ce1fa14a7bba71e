// A bus reference from `get_bus` cannot be kept across an `unregister_dev`
// under the same slots guard: the old table is freed after the grace
// period, before `unregister_dev` returns.
use kvm_bus::{Access, BusKind, Buses, Declined, WriteResult, IoDevice, IoRange};
use std::sync::Arc;

struct Sink;
impl IoDevice for Sink {
    fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
}

fn main() {
    let buses = Buses::new();
    let dev: Arc<dyn IoDevice> = Arc::new(Sink);
    let mut slots = buses.lock_slots();
    let range = IoRange::new(0x60, 1).unwrap();
    buses.register_dev(&mut slots, BusKind::Pio, range, dev.clone()).unwrap();
    let bus = buses.get_bus(&slots, BusKind::Pio);
    buses.unregister_dev(&mut slots, BusKind::Pio, &dev).unwrap();
    println!("{}", bus.len()); // LATER USE
}
