//! `objdump -d` target: the read fast paths as standalone functions.
//! `cargo build --release -p srcu --example fastpath_asm && objdump -d --no-show-raw-insn -M intel target/release/examples/fastpath_asm | grep -A40 '<fastpath_asm::fast_section>:'`
use srcu::{Classic, Fast, Srcu};

#[inline(never)]
pub fn fast_section(s: &Srcu<Fast>) {
    drop(s.read_lock());
}

#[inline(never)]
pub fn classic_section(s: &Srcu<Classic>) {
    drop(s.read_lock());
}

fn main() {
    let f = Srcu::new_fast();
    let c = Srcu::new();
    for _ in 0..std::hint::black_box(10) {
        fast_section(&f);
        classic_section(&c);
    }
    println!("{:?} {:?}", f.counter_path(), c.counter_path());
}
