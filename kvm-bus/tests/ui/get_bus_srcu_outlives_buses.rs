// The read-path reference also borrows the Buses: it cannot survive it,
// even if the guard came from elsewhere.
use kvm_bus::{BusKind, Buses, IoBus, Srcu};

fn keep<'g>(guard: &'g kvm_bus::ReadGuard<'g>) -> &'g IoBus {
    let buses = Buses::with_srcu(Srcu::new(), 8);
    buses.get_bus_srcu(guard, BusKind::Mmio)
}

fn main() {
    let srcu = Srcu::new();
    let g = srcu.read_lock();
    println!("{}", keep(&g).len());
}
