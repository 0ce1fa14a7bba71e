use srcu::{Srcu, SrcuCell, UpdateLock};

fn main() {
    let srcu = Srcu::new();
    let lock = UpdateLock::new(());
    let cell = SrcuCell::new(&srcu, &lock, Some(5u32));
    let r = {
        let guard = srcu.read_lock();
        cell.dereference(&guard).unwrap()
    };
    println!("{r}");
}
