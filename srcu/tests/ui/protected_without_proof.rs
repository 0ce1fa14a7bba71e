use srcu::{Srcu, SrcuCell, UpdateLock};

fn main() {
    let srcu = Srcu::new();
    let lock = UpdateLock::new(());
    let cell = SrcuCell::new(&srcu, &lock, Some(5u32));
    let guard = srcu.read_lock();
    // A read guard is no proof of holding the update lock.
    let _ = cell.dereference_protected(&guard);
    // Nor is nothing.
    let _ = cell.dereference_protected();
}
