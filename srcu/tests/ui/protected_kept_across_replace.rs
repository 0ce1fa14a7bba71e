// A reference from dereference_protected must not survive an update made
// under the same UpdateGuard: the update could free what it points to.
use srcu::{Srcu, SrcuCell, UpdateLock};

fn main() {
    let srcu = Srcu::new();
    let lock = UpdateLock::new(());
    let cell = SrcuCell::new(&srcu, &lock, Some(1));
    let mut g = lock.lock();
    let r = cell.dereference_protected(&g).unwrap();
    let stale = cell.replace(Some(2), &mut g);
    drop(stale.map(|s| s.synchronize())); // frees the value `r` points to
    println!("{r}");
}
