//! [`KeyIndex`]: the sorted start addresses of an [`IoBus`](crate::IoBus),
//! indexed so that finding the entries at or before an address costs two
//! dependent loads instead of a binary search's `log2(n)`.

use core::mem::MaybeUninit;

/// Keys per block of a [`KeyIndex`] tree level: the `u64`s of one cache
/// line.
pub(crate) const BLOCK: usize = 8;

/// Tree levels below the top, at most: `BLOCK.pow(MAX_DEPTH)` is `2^63`.
const MAX_DEPTH: usize = 21;

/// A sorted array of `u64` (it derefs to it), indexed for
/// [`count_le`](KeyIndex::count_le) (`partition_point(|&k| k <= x)`).
///
/// A binary search is `log2(n)` dependent steps (load, compare, select the
/// next index), ~8 cycles each even from L1 and whether it branches or
/// not: ~80 cycles for 1000 devices, about half the cost of a dispatch on
/// such a bus. This index answers with two dependent loads for keys spread
/// over their span (every evenly spaced table) and with `log8(n)`
/// one-line steps otherwise. Both are branchless; the branches on `x` only
/// pick the path (constant for a table whose buckets are all of one kind).
///
/// * **Buckets** (every non-empty table): the keys' span cut
///   into at most `n.next_power_of_two()` buckets of `1 << shift`
///   addresses, with the number of keys before each. If the bucket of `x`
///   holds at most `BLOCK` keys, the answer is that number plus the count
///   of keys `<= x` among the `BLOCK` keys from there (the keys past the
///   bucket are greater than `x`); if no bucket of the table holds more
///   than one key (evenly spaced devices: the common bus), among the one
///   key from there: one compare, whatever the table's size.
/// * Otherwise (clustered keys, a far outlier), **a static B+ tree**, in
///   one allocation, top level first: the bottom level is the keys, padded
///   with `u64::MAX` to whole blocks (plus one block, for the bucket
///   count); the level above a padded level of `b` blocks holds the last
///   key of each of its first `b - 1` blocks, padded the same way; levels
///   are added until one has at most `BLOCK` keys: the top, counted as a
///   block like the others (its padding is greater than `x`). Every level starts
///   64-byte aligned, so a block is one cache line, counted with eight
///   independent loads and compares.
///
/// Why the tree is exact, for `x < u64::MAX` (padding keys are then
/// greater than `x`; `u64::MAX` itself is answered with `len`): if `c`
/// keys of a summary level are `<= x`, the blocks `0..c` of the level below
/// end with a key `<= x` and so are `<= x` throughout (sorted), and block
/// `c` (which exists: `c <= b - 1`) either ends with a key `> x` or is the
/// last one. So the keys `<= x` below are the `BLOCK * c` of blocks `0..c`
/// and those of block `c`.
pub(crate) struct KeyIndex {
    /// One allocation: the tree levels, top first (one block from
    /// `buf[top]`, then level `k + 1` from `buf[levels_at + k]`, the bottom
    /// one at `bottom`) and a block of padding; the start of each level
    /// below the top (`depth` of them); the bucket table (`buckets + 1`
    /// entries from `first_at`: the number of keys before bucket `b`, then
    /// `len`).
    buf: Vec<u64>,
    top: usize,
    depth: usize,
    levels_at: usize,
    bottom: usize,
    /// Number of keys.
    len: usize,
    /// The smallest key: bucket `b` holds the keys in `base + (b << shift)
    /// ..base + ((b + 1) << shift)`.
    base: u64,
    shift: u32,
    first_at: usize,
    /// Number of buckets (at least 1; 0 only in the empty index).
    buckets: usize,
    /// How a lookup counts inside its bucket, decided once per table from
    /// its fullest bucket (so the branch on it is always predicted): `1`
    /// (every bucket holds at most one key: one compare), [`BLOCK`] (at
    /// most a block: one line of compares), `0` (some bucket holds more:
    /// check the bucket, and search the tree if it is crowded).
    bucket_width: usize,
}

impl KeyIndex {
    pub(crate) const EMPTY: KeyIndex = KeyIndex {
        buf: Vec::new(),
        top: 0,
        depth: 0,
        levels_at: 0,
        bottom: 0,
        len: 0,
        base: 0,
        shift: 0,
        first_at: 0,
        buckets: 0,
        bucket_width: 0,
    };

    /// The index of the keys of `items`, which are in key order.
    pub(crate) fn new<T>(items: &[T], key: impl Fn(&T) -> u64) -> KeyIndex {
        debug_assert!(items.windows(2).all(|w| key(&w[0]) <= key(&w[1])));
        let n = items.len();
        if n == 0 {
            return KeyIndex::EMPTY;
        }
        Self::build(
            n,
            key(&items[0]),
            key(&items[n - 1]),
            |i| key(&items[i]),
            |keys| {
                for (slot, item) in keys.iter_mut().zip(items) {
                    *slot = MaybeUninit::new(key(item));
                }
            },
            |shift, table| {
                let base = key(&items[0]);
                Self::width_of(Self::fill_buckets(
                    items.iter().map(&key),
                    base,
                    shift,
                    table,
                ))
            },
        )
    }

    /// These keys with `key` inserted at position `pos` (after the `pos`
    /// smallest: the keys stay sorted), or `None` if the new keys need
    /// other buckets than these (a new smallest key, or a span or count
    /// that changes the bucket width); [`new`](KeyIndex::new) builds those.
    ///
    /// What a registration usually needs: the same buckets with one more
    /// key. The bucket table is then this one's with one added past the new
    /// key's bucket (a copy and an add per word, no pass over the keys),
    /// and the keys are copied around the new one, instead of the ~20
    /// instructions per key of `fill_buckets`. The result is the index
    /// `new` would build, word for word (tested).
    pub(crate) fn with_inserted(&self, pos: usize, key: u64) -> Option<KeyIndex> {
        let old: &[u64] = self;
        let n = old.len();
        // A new smallest key moves the buckets; one equal to the smallest
        // (a second device at the lowest address, which goes first) does not.
        if pos > n || old.first().is_none_or(|&first| pos == 0 && key != first) {
            return None;
        }
        debug_assert!(
            pos.checked_sub(1).is_none_or(|p| old[p] <= key)
                && old.get(pos).is_none_or(|&k| key <= k)
        );
        let last = if pos == n { key } else { old[n - 1] };
        let (shift, buckets) = Self::bucket_layout(n + 1, last - self.base);
        if shift != self.shift {
            return None;
        }
        // `buckets >= self.buckets`: same base and width, span not smaller.
        let with_key = |i: usize| match i.cmp(&pos) {
            core::cmp::Ordering::Less => old[i],
            core::cmp::Ordering::Equal => key,
            core::cmp::Ordering::Greater => old[i - 1],
        };
        Some(Self::build(
            n + 1,
            self.base,
            last,
            with_key,
            |keys| {
                let (before, rest) = keys.split_at_mut(pos);
                let (slot, after) = rest.split_first_mut().expect("room for the new key");
                for (d, &k) in before.iter_mut().zip(&old[..pos]) {
                    *d = MaybeUninit::new(k);
                }
                *slot = MaybeUninit::new(key);
                for (d, &k) in after.iter_mut().zip(&old[pos..]) {
                    *d = MaybeUninit::new(k);
                }
            },
            |_, table| {
                debug_assert_eq!(table.len(), buckets + 1);
                let old_table = &self.buf[self.first_at..=self.first_at + self.buckets];
                self.counts_with_one_more(old_table, key, table)
            },
        ))
    }

    /// The bucket table of these keys plus `key`, with the same buckets
    /// (`table` may have more of them, past the old last one): bucket `b`
    /// counts the old keys before it (`old_table[b]`, or all `n` past the
    /// old buckets) and the new key if its bucket is before `b`. Returns
    /// the new [`bucket_width`](KeyIndex::bucket_width): only the new
    /// key's bucket grew.
    fn counts_with_one_more(
        &self,
        old_table: &[u64],
        key: u64,
        table: &mut [MaybeUninit<u64>],
    ) -> usize {
        let (n, ob) = (self.len as u64, self.buckets);
        // The first bucket that counts the new key (`past <= ob` unless the
        // key is beyond the old buckets).
        let past = ((key - self.base) >> self.shift) as usize + 1;
        // Three runs, each a copy or a fill that vectorises: the buckets
        // before `past` as they were (old ones copied, new ones all `n`),
        // old buckets from `past` with one more, new ones past both `n + 1`.
        let copied = past.min(ob + 1);
        let (head, rest) = table.split_at_mut(copied);
        for (slot, &count) in head.iter_mut().zip(&old_table[..copied]) {
            *slot = MaybeUninit::new(count);
        }
        let tail = if past <= ob {
            let (plus_one, tail) = rest.split_at_mut(ob + 1 - past);
            for (slot, &count) in plus_one.iter_mut().zip(&old_table[past..]) {
                *slot = MaybeUninit::new(count + 1);
            }
            tail
        } else {
            let (all_old, tail) = rest.split_at_mut(past - (ob + 1));
            all_old.fill(MaybeUninit::new(n));
            tail
        };
        tail.fill(MaybeUninit::new(n + 1));
        // SAFETY: every word of `table` was written just above (the three
        // runs split it).
        let at = |b: usize| unsafe { table[b].assume_init() };
        let grown = (at(past) - at(past - 1)) as usize;
        match (grown, self.bucket_width) {
            (0..=1, width) => width,
            (2..=BLOCK, 0) => 0,
            (2..=BLOCK, _) => BLOCK,
            _ => 0,
        }
    }

    /// How many buckets, and how wide (`1 << shift` addresses), for `n`
    /// keys spanning `span` addresses: at most `n.next_power_of_two()`,
    /// with the smallest shift that allows.
    fn bucket_layout(n: usize, span: u64) -> (u32, usize) {
        let most = n.next_power_of_two();
        let shift = (u64::BITS - span.leading_zeros()).saturating_sub(most.trailing_zeros());
        (shift, (span >> shift) as usize + 1)
    }

    /// The lookup a table needs, from its fullest bucket (see the field).
    fn width_of(fullest: usize) -> usize {
        match fullest {
            0 | 1 => 1,
            2..=BLOCK => BLOCK,
            _ => 0,
        }
    }

    /// The index of `n > 0` sorted keys from `base` to `last`: `key_at(i)`
    /// is key `i`, `write_keys` writes them all (the bottom level, `n`
    /// words), `write_buckets(shift, table)` the bucket table (all of
    /// `table`) and returns the bucket width.
    fn build(
        n: usize,
        base: u64,
        last: u64,
        key_at: impl Fn(usize) -> u64,
        write_keys: impl FnOnce(&mut [MaybeUninit<u64>]),
        write_buckets: impl FnOnce(u32, &mut [MaybeUninit<u64>]) -> usize,
    ) -> KeyIndex {
        // Keys per level, bottom-up: the level above `m` keys has
        // `m.div_ceil(BLOCK) - 1`; its `j`-th key is the last of block
        // `j` below, so key `(j + 1) * BLOCK.pow(k) - 1` on level `k`.
        let mut sizes = [0; MAX_DEPTH + 1];
        sizes[0] = n;
        let mut depth = 0;
        while sizes[depth] > BLOCK {
            sizes[depth + 1] = sizes[depth].div_ceil(BLOCK) - 1;
            depth += 1;
        }
        let (shift, buckets) = Self::bucket_layout(n, last - base);
        let tree = sizes[..=depth]
            .iter()
            .map(|m| m.next_multiple_of(BLOCK))
            .sum::<usize>()
            + BLOCK;
        let total = tree + depth + buckets + 1;
        // Pads the front to the first 64-byte boundary (the capacity
        // leaves room for it). Every word up to `front + total` is written
        // once, into the spare capacity (the buffer is never moved), and
        // only then counted in.
        let mut buf: Vec<u64> = Vec::with_capacity(total + BLOCK - 1);
        let front = buf.as_ptr().align_offset(64).min(BLOCK - 1);
        let out = &mut buf.spare_capacity_mut()[..front + total];
        let u = MaybeUninit::new;
        out[..front].fill(u(u64::MAX));
        // The levels, top first, each padded to whole blocks with
        // `u64::MAX`, then a block of padding.
        let mut levels = [0; MAX_DEPTH];
        let mut at = front;
        let mut write_keys = Some(write_keys);
        for k in (0..=depth).rev() {
            if k < depth {
                levels[depth - 1 - k] = at as u64;
            }
            let level = &mut out[at..at + sizes[k].next_multiple_of(BLOCK)];
            let (keys, padding) = level.split_at_mut(sizes[k]);
            if k == 0 {
                (write_keys.take().expect("one bottom level"))(keys);
            } else {
                let stride = BLOCK.pow(k as u32);
                for (j, slot) in keys.iter_mut().enumerate() {
                    *slot = u(key_at((j + 1) * stride - 1));
                }
            }
            padding.fill(u(u64::MAX));
            at += level.len();
        }
        let bottom = at - n.next_multiple_of(BLOCK);
        out[at..at + BLOCK].fill(u(u64::MAX));
        at += BLOCK;
        let levels_at = at;
        for (slot, &level) in out[at..at + depth].iter_mut().zip(&levels) {
            *slot = u(level);
        }
        let first_at = at + depth;
        let bucket_width = write_buckets(shift, &mut out[first_at..]);
        // SAFETY: `out`, the first `front + total` words of the spare
        // capacity, is written throughout: the front padding, each level's
        // keys (`write_keys` writes all of the bottom one) and padding and
        // the padding block back to back (`at` moves on by what was
        // written), the `depth` level starts, and the bucket table, the
        // rest of `out` (`total` counts exactly these), which
        // `write_buckets` writes all of.
        unsafe { buf.set_len(front + total) };
        debug_assert_eq!(
            bottom,
            if depth == 0 {
                front
            } else {
                levels[depth - 1] as usize
            }
        );
        KeyIndex {
            top: front,
            depth,
            levels_at,
            bottom,
            len: n,
            base,
            shift,
            first_at,
            buckets,
            bucket_width,
            buf,
        }
    }

    /// Writes the bucket table (`buckets + 1` words, all of `table`) of
    /// the sorted `keys`, whose smallest is `base` and whose buckets are
    /// `1 << shift` wide: bucket `b` gets the number of keys before it, the
    /// last word the number of keys. Returns the most keys in one bucket.
    ///
    /// Each key writes the counts of the buckets from the next unwritten
    /// one up to its own (its index): one word for evenly spread keys. The
    /// fullest bucket is measured where a bucket's first key ends the run
    /// of the one before. Out of line, so that its few variables live in
    /// registers: ~10 instructions per key.
    #[inline(never)]
    fn fill_buckets(
        keys: impl ExactSizeIterator<Item = u64>,
        base: u64,
        shift: u32,
        table: &mut [MaybeUninit<u64>],
    ) -> usize {
        let n = keys.len();
        let buckets = table.len() - 1;
        let (mut next, mut run_start, mut fullest) = (0, 0, 0);
        for (j, k) in keys.enumerate() {
            let b = ((k.wrapping_sub(base)) >> shift) as usize;
            // Every key is in `base..=base + span` and `buckets` is
            // `(span >> shift) + 1`, so `b < buckets`, and `next <= b + 1`
            // (keys sorted). Checked in every build: keys out of order (a
            // bug in a table builder) must not write out of bounds below.
            assert!(b < buckets, "key index: keys out of order");
            debug_assert!(next <= b + 1);
            if next <= b {
                fullest = fullest.max(j - run_start);
                run_start = j;
                // The bucket of `j`, then any empty ones before it: the
                // common case (one word) skips the set-up of the
                // vectorised fill that the loop compiles to.
                // SAFETY: `b < buckets < table.len()` (above).
                unsafe { table.get_unchecked_mut(b).write(j as u64) };
                while next < b {
                    // SAFETY: `next < b`, and `b < table.len()` (above).
                    unsafe { table.get_unchecked_mut(next).write(j as u64) };
                    next += 1;
                }
                next = b + 1;
            }
        }
        for slot in &mut table[next..] {
            slot.write(n as u64);
        }
        fullest.max(n - run_start)
    }

    /// The bytes of its buffer.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.buf.capacity() * core::mem::size_of::<u64>()
    }

    /// The most keys in one bucket (0 without buckets).
    #[cfg(test)]
    pub(crate) fn fullest_bucket(&self) -> usize {
        let first = &self.buf[self.first_at..];
        (0..self.buckets)
            .map(|b| (first[b + 1] - first[b]) as usize)
            .max()
            .unwrap_or(0)
    }

    /// Number of keys `<= x` (`partition_point(|&k| k <= x)`).
    ///
    /// For a table of evenly spread keys (every bucket holds at most one):
    /// two dependent loads (the bucket's count, the key it points at) and
    /// one compare; the branches test values fixed per table.
    #[inline(always)]
    pub(crate) fn count_le(&self, x: u64) -> usize {
        if x == u64::MAX {
            return self.len;
        }
        // (The empty index has no buckets: every `x` is past them, and the
        // answer is `len`, 0.)
        let Some(offset) = x.checked_sub(self.base) else {
            return 0;
        };
        let b = offset >> self.shift;
        if b >= self.buckets as u64 {
            return self.len;
        }
        let at = self.first_at + b as usize;
        // SAFETY: `b < buckets`, and the bucket table is the `buckets +
        // 1` words from `first_at` (`new`), so `at` and `at + 1` are
        // inside `buf`.
        let before = unsafe { *self.buf.get_unchecked(at) } as usize;
        // The keys from `before` on: those of bucket `b`, then greater
        // ones (later buckets, then padding, all `> x`).
        //
        // SAFETY: `before <= len`, and the bottom level (`len` keys
        // from `bottom`) is followed by at least a block of padding
        // inside `buf` (`new`): `bottom + before + BLOCK <= buf.len()`.
        let keys = unsafe { self.buf.as_ptr().add(self.bottom + before) };
        if self.bucket_width == 1 {
            // At most one key of the bucket: it is the first one, if any.
            // SAFETY: see `keys`.
            return before + usize::from(unsafe { *keys } <= x);
        }
        // SAFETY: as `before`.
        let end = unsafe { *self.buf.get_unchecked(at + 1) } as usize;
        if self.bucket_width == BLOCK || end - before <= BLOCK {
            // SAFETY: see `keys`: a whole block is in bounds (and
            // `u64`-aligned, from a `Vec<u64>`).
            return before + Self::count_block(unsafe { &*keys.cast::<[u64; BLOCK]>() }, x);
        }
        self.count_le_in_tree(x)
    }

    /// [`count_le`](KeyIndex::count_le) through the tree: tables with a
    /// crowded bucket. Out of line, so that the bucket
    /// path inlined into dispatch keeps few registers live.
    #[inline(never)]
    fn count_le_in_tree(&self, x: u64) -> usize {
        let top: &[u64; BLOCK] = self.buf[self.top..]
            .first_chunk()
            .expect("the top level is padded to a whole block");
        let mut i = Self::count_block(top, x);
        for &level in &self.buf[self.levels_at..self.levels_at + self.depth] {
            let block: &[u64; BLOCK] = self.buf[level as usize + i * BLOCK..]
                .first_chunk()
                .expect("a summary count indexes a block of the level below");
            i = i * BLOCK + Self::count_block(block, x);
        }
        i
    }

    /// [`count_le`](KeyIndex::count_le), not inlined: the second search,
    /// on buses with overlaps only, stays out of the dispatch code.
    #[inline(never)]
    pub(crate) fn count_le_outlined(&self, x: u64) -> usize {
        self.count_le(x)
    }

    /// Number of keys `<= x` in `block`, branchless.
    #[inline(always)]
    fn count_block(block: &[u64; BLOCK], x: u64) -> usize {
        let mut c = BLOCK;
        for &k in block {
            c -= usize::from(x < k);
        }
        c
    }
}

impl core::ops::Deref for KeyIndex {
    type Target = [u64];

    /// The keys, sorted.
    fn deref(&self) -> &[u64] {
        &self.buf[self.bottom..self.bottom + self.len]
    }
}

/// For the tests of this module and of `bus.rs`: xorshift64 from a fixed
/// seed, giving numbers below `n`.
#[cfg(test)]
pub(crate) fn rng(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count_le` against `partition_point` for every table size up to
    /// several tree levels (and some bigger ones): keys with many
    /// duplicates, spread at random over small and huge spans (`0` and
    /// `u64::MAX` included), evenly spaced (then every bucket holds at most
    /// a block: the bucket path), in clusters with outliers (both paths);
    /// probed at, next to and between the keys.
    #[test]
    fn key_index_counts_like_partition_point() {
        let mut rnd = rng(0x9e37_79b9_7f4a_7c15);
        let sizes = (0..=600).chain([1000, 4095, 4096, 4097, 5000, 33000]);
        let mut widths_seen = [0usize; BLOCK + 1];
        for (round, n) in sizes.enumerate() {
            let layout = round % 6;
            let (start, stride) = (rnd(1 << 40), 1 + rnd(0x1_0000));
            let mut keys: Vec<u64> = (0..n as u64)
                .map(|i| match layout {
                    0 => rnd(8),
                    1 => rnd(1 << 20),
                    2 => rnd(u64::MAX),
                    3 => start + i * stride,
                    4 => u64::MAX - i * stride,
                    // Clusters of 4-byte doorbells, and an outlier.
                    _ if i == 0 => u64::MAX - rnd(4),
                    _ => ((i % 7) << 32) | (rnd(0x400) * 4),
                })
                .collect();
            if layout == 2 && n > 0 {
                keys[0] = u64::MAX;
                keys[n - 1] = 0;
            }
            keys.sort_unstable();
            let t = KeyIndex::new(&keys, |&k| k);
            assert_eq!(&*t, &keys[..], "deref gives the keys back");
            widths_seen[t.bucket_width] += 1;
            let fullest = t.fullest_bucket();
            let width_fits = match t.bucket_width {
                1 => fullest <= 1,
                BLOCK => (2..=BLOCK).contains(&fullest),
                _ => fullest > BLOCK || n == 0,
            };
            assert!(
                width_fits,
                "n {n}: width {} fullest {fullest}",
                t.bucket_width
            );
            #[cfg(not(miri))]
            if n > 0 {
                assert_eq!(t.buf[t.top..].as_ptr() as usize % 64, 0, "n {n}: aligned");
            }
            if layout >= 3 && n > BLOCK {
                let crowded = t.fullest_bucket() > BLOCK;
                assert_eq!(crowded, layout == 5, "n {n} layout {layout}");
            }
            let probes = keys
                .iter()
                .step_by(n / 5000 + 1)
                .flat_map(|&k| [k.wrapping_sub(1), k, k.wrapping_add(1)])
                .chain([0, 1, u64::MAX - 1, u64::MAX])
                .chain((0..64).map(|_| {
                    let (lo, hi) = (
                        keys.first().copied().unwrap_or(0),
                        keys.last().copied().unwrap_or(0),
                    );
                    lo + rnd((hi - lo).max(1))
                }))
                .collect::<Vec<_>>();
            for x in probes {
                assert_eq!(
                    t.count_le(x),
                    keys.partition_point(|&k| k <= x),
                    "n {n} layout {layout} x {x:#x}"
                );
            }
        }
        // All three lookups ran: one compare, one block, the tree.
        for width in [0, 1, BLOCK] {
            assert!(widths_seen[width] > 50, "width {width}: {widths_seen:?}");
        }
    }

    /// What an index is, apart from where its allocation happens to
    /// start: the words from the top level on (level starts made relative
    /// to it) and the fields.
    fn layout_of(t: &KeyIndex) -> (Vec<u64>, [usize; 8], u64, u32) {
        let mut words = t.buf[t.top..].to_vec();
        for w in &mut words[t.levels_at - t.top..t.levels_at - t.top + t.depth] {
            *w -= t.top as u64;
        }
        let at = [t.levels_at, t.bottom, t.first_at].map(|x| x - t.top);
        let fields = [
            t.depth,
            at[0],
            at[1],
            at[2],
            t.len,
            t.buckets,
            t.bucket_width,
            0,
        ];
        (words, fields, t.base, t.shift)
    }

    /// `with_inserted` builds, word for word, the index `new` builds from
    /// the keys with the new one, whenever it builds one: keys appended
    /// (a registration above the others), inserted in the middle, equal to
    /// existing ones, into tables of every bucket width and across tree
    /// level boundaries. It declines (`None`) only when the buckets change,
    /// and it takes the common cases: most appends to evenly spaced keys.
    #[test]
    fn with_inserted_builds_what_new_builds() {
        let mut rnd = rng(0x51de_cafe);
        let (mut reused, mut appends_reused, mut declined) = (0, 0, 0);
        for n in (1..=300).chain([511, 512, 513, 1000, 4096]) {
            for layout in 0..5 {
                let stride = 1 + rnd(0x1000);
                let mut keys: Vec<u64> = (0..n as u64)
                    .map(|i| match layout {
                        0 => 0x1000 + i * stride,
                        1 => rnd(1 << 20),
                        2 => rnd(16),
                        3 => ((i % 5) << 32) | rnd(0x100),
                        _ => 0xd000 + i * 0x1000 + rnd(0x800),
                    })
                    .collect();
                keys.sort_unstable();
                let t = KeyIndex::new(&keys, |&k| k);
                let (first, last) = (keys[0], keys[n - 1]);
                let candidates = [
                    last + stride,
                    last,
                    first + rnd(last - first + 1),
                    keys[rnd(n as u64) as usize],
                    first,
                    last + rnd(1 << 24),
                ];
                for key in candidates {
                    let pos = keys.partition_point(|&k| k <= key);
                    let mut with = keys.clone();
                    with.insert(pos, key);
                    let Some(inc) = t.with_inserted(pos, key) else {
                        let full = KeyIndex::new(&with, |&k| k);
                        assert!(
                            full.shift != t.shift || full.base != t.base,
                            "n {n} layout {layout}: declined a key that keeps the buckets"
                        );
                        declined += 1;
                        continue;
                    };
                    let full = KeyIndex::new(&with, |&k| k);
                    assert_eq!(
                        layout_of(&inc),
                        layout_of(&full),
                        "n {n} layout {layout} key {key:#x}"
                    );
                    assert_eq!(inc.fullest_bucket(), full.fullest_bucket());
                    for x in [key.wrapping_sub(1), key, key + 1, first, last] {
                        assert_eq!(inc.count_le(x), with.partition_point(|&k| k <= x));
                    }
                    reused += 1;
                    appends_reused += usize::from(pos == n && layout == 0);
                }
            }
        }
        assert!(
            reused > 3 * declined,
            "reused {reused}, declined {declined}"
        );
        assert!(appends_reused > 250, "{appends_reused}");
    }

    /// Every multiset of up to `most` keys drawn from `alphabet`, in order.
    fn multisets(alphabet: &[u64], most: usize) -> Vec<Vec<u64>> {
        let mut all = vec![vec![]];
        let mut last: Vec<(Vec<u64>, usize)> = vec![(vec![], 0)];
        for _ in 0..most {
            let mut next = Vec::new();
            for (set, from) in &last {
                for (i, &k) in alphabet.iter().enumerate().skip(*from) {
                    let mut grown = set.clone();
                    grown.push(k);
                    next.push((grown, i));
                }
            }
            all.extend(next.iter().map(|(set, _)| set.clone()));
            last = next;
        }
        all
    }

    /// `with_inserted` against `new`, exhaustively on small key spaces
    /// (from a review): every multiset of up to 5 keys from alphabets of
    /// 10 values at the bottom, the top and the middle of the address
    /// space and strided like devices, and of up to 10 keys from 4 values
    /// (crowded buckets: the tree lookup); every key of the alphabet
    /// inserted at every position that keeps the keys sorted (each place
    /// in a run of equal keys). Whenever it builds an index, it is `new`'s
    /// word for word and counts like `partition_point` at every value of
    /// the alphabet and next to it; it declines only when `new` picks
    /// other buckets.
    #[test]
    fn with_inserted_matches_new_on_small_key_spaces() {
        let (m, h) = (u64::MAX, 1u64 << 63);
        let cases: [(Vec<u64>, usize); 5] = [
            ((0..10).collect(), 5),
            ((0..10).map(|i| m - 9 + i).collect(), 5),
            (vec![0, 1, 7, h - 1, h, h + 1, m - 2, m - 1, m, 3], 5),
            ((0..10).map(|i| 0xd000 + i * 0x1000).collect(), 5),
            (vec![0, 1, 2, 1 << 40], 10),
        ];
        let (mut built, mut declined) = (0, 0);
        for (mut alphabet, most) in cases {
            alphabet.sort_unstable();
            let probes: Vec<u64> = alphabet
                .iter()
                .flat_map(|&a| [a.wrapping_sub(1), a, a.wrapping_add(1)])
                .chain([0, m])
                .collect();
            for keys in multisets(&alphabet, most).iter().filter(|k| !k.is_empty()) {
                let t = KeyIndex::new(keys, |&k| k);
                for &key in &alphabet {
                    let (lo, hi) = (
                        keys.partition_point(|&k| k < key),
                        keys.partition_point(|&k| k <= key),
                    );
                    let mut with = keys.clone();
                    with.insert(lo, key);
                    let full = KeyIndex::new(&with, |&k| k);
                    for pos in lo..=hi {
                        let Some(inc) = t.with_inserted(pos, key) else {
                            assert!(
                                full.shift != t.shift || full.base != t.base,
                                "declined {keys:?} + {key:#x} at {pos}"
                            );
                            declined += 1;
                            continue;
                        };
                        assert_eq!(layout_of(&inc), layout_of(&full), "{keys:?} + {key:#x}");
                        for &x in &probes {
                            assert_eq!(inc.count_le(x), with.partition_point(|&k| k <= x));
                        }
                        built += 1;
                    }
                }
            }
        }
        assert!(built > 2 * declined, "built {built}, declined {declined}");
    }

    /// Every word of an index's buffer is written by `new` and
    /// `with_inserted` (which fill spare capacity and then set the length): each word is used in a
    /// branch here, so valgrind memcheck (`scripts/valgrind.sh` runs this
    /// crate's unit tests) reports any left uninitialised; the tree is
    /// walked for keys of every layout too. Sizes across block and level
    /// boundaries; duplicates, `u64::MAX`, huge and tiny spans, clusters.
    /// (From a review of the spare-capacity build.)
    #[test]
    fn every_word_of_the_buffer_is_written() {
        let mut rnd = rng(0x1234_5678);
        let mut sizes: Vec<usize> = (1..=200).collect();
        sizes.extend([255, 256, 257, 511, 512, 513, 1000, 4095, 4096, 4097]);
        let mut sentinel_hits = 0;
        for &n in &sizes {
            for layout in 0..7 {
                let mut keys: Vec<u64> = (0..n as u64)
                    .map(|i| match layout {
                        0 => 5,
                        1 => u64::MAX,
                        2 => rnd(u64::MAX),
                        3 => i * 8,
                        4 if i == 0 => 0,
                        4 => u64::MAX,
                        5 => rnd(16),
                        _ => ((i % 3) << 40) | rnd(64),
                    })
                    .collect();
                keys.sort_unstable();
                let t = KeyIndex::new(&keys, |&k| k);
                assert_eq!(&*t, &keys[..]);
                // And `with_inserted`'s copy, with a key added at the end
                // and in the middle, when it makes one.
                let (last, mid) = (keys[n - 1], keys[n / 2]);
                let grown = [
                    t.with_inserted(n, last.saturating_add(8)),
                    t.with_inserted(keys.partition_point(|&k| k <= mid), mid),
                ];
                for t in grown.iter().flatten().chain([&t]) {
                    for &w in &t.buf {
                        if core::hint::black_box(w) == 0x1234_5678_9abc_def0 {
                            sentinel_hits += 1;
                        }
                    }
                }
                for &k in keys.iter().step_by(n / 50 + 1) {
                    let x = k.saturating_sub(1);
                    assert_eq!(
                        t.count_le_in_tree(x),
                        keys.partition_point(|&y| y <= x),
                        "n {n} layout {layout}"
                    );
                }
            }
        }
        assert_eq!(sentinel_hits, 0);
    }
}
