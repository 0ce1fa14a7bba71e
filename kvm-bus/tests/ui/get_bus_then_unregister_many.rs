// A bus reference from `get_bus` cannot be kept across an
// `unregister_many` under the same slots guard.
use kvm_bus::{Access, BusKind, Buses, Declined, WriteResult, IoDevice, IoRange};
use std::sync::Arc;

struct Sink;
impl IoDevice for Sink {
    fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
}

fn main() {
    let buses = Buses::new();
    let devs: Vec<Arc<dyn IoDevice>> = vec![Arc::new(Sink), Arc::new(Sink)];
    let mut slots = buses.lock_slots();
    let batch = devs
        .iter()
        .enumerate()
        .map(|(i, d)| (IoRange::new(0x1000 * i as u64, 4).unwrap(), d.clone()));
    buses.register_many(&mut slots, BusKind::Mmio, batch).unwrap();
    let bus = buses.get_bus(&slots, BusKind::Mmio);
    buses.unregister_many(&mut slots, BusKind::Mmio, &devs).unwrap();
    println!("{}", bus.len()); // LATER USE
}
