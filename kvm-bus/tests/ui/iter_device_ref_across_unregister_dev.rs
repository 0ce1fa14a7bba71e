// A device reference from `IoBus::iter` on the update side cannot be kept
// across `unregister_dev` of that device: the buses drop their strong
// count before it returns, which may free the device.
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
    let range = IoRange::new(0x60, 1).unwrap();
    buses.register_dev(&mut slots, BusKind::Pio, range, Arc::new(Sink)).unwrap();
    let (_, d) = buses.get_bus(&slots, BusKind::Pio).iter().next().unwrap();
    let owned = d.clone();
    buses.unregister_dev(&mut slots, BusKind::Pio, &owned).unwrap();
    let _ = d.write(Access::new(0x60, 0, None), &[1]); // LATER USE
}
