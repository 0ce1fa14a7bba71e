// A device reference from `IoBus::get_dev` on the update side cannot be
// kept across `unregister_dev` of that device.
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
    let range = IoRange::new(0xd000_0000, 0x1000).unwrap();
    buses.register_dev(&mut slots, BusKind::Mmio, range, Arc::new(Sink)).unwrap();
    let d = buses.get_bus(&slots, BusKind::Mmio).get_dev(0xd000_0010).unwrap();
    let owned = d.clone();
    buses.unregister_dev(&mut slots, BusKind::Mmio, &owned).unwrap();
    let _ = d.write(Access::new(0xd000_0000, 0x10, None), &[1]); // LATER USE
}
