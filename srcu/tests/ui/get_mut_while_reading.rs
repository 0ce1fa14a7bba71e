use srcu::{Srcu, SrcuCell, UpdateLock};

fn main() {
    let srcu = Srcu::new();
    let lock = UpdateLock::new(());
    let mut cell = SrcuCell::new(&srcu, &lock, Some(5u32));
    let guard = srcu.read_lock();
    let r = cell.dereference(&guard).unwrap();
    // Exclusive access is impossible while a reader reference lives.
    let _ = cell.get_mut();
    println!("{r}");
}
