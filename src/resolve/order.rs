//! Ordering a resolution's candidates without a comparison sort of all of them.
//!
//! The order is (rank, id). Ranks take few distinct values (a manifest's variants share
//! backends, toolkits and CPU levels), while ids are unique and share long prefixes
//! (`cu128-static-x86_64-linux-…`), so a comparison sort spends most of its time on ties
//! broken by `memcmp`, and grows as n log n. Here the ids are put in order once by a
//! most-significant-byte radix sort, linear in their total length, and the candidates are
//! then dealt, in id order, into one group per distinct rank: O(n log k) for k distinct
//! ranks, plus the ids' bytes.

use std::collections::BTreeMap;

/// Below this many ids, a group is finished with a comparison sort of the remaining bytes.
const SMALL: usize = 32;

/// How many shared bytes a group's prefix skip looks at per pass.
const CHUNK: usize = 16;

/// The positions of `ids`, in ascending byte order of the ids (a shorter id before any
/// longer one it is a prefix of, as `str`'s `Ord` has it). Linear in the ids' total length
/// plus a comparison sort of at most `SMALL` ids per group; no recursion, so no id length
/// can exhaust the stack.
pub(super) fn id_order(ids: &[&[u8]]) -> Vec<usize> {
    let n = ids.len();
    let mut idx: Vec<usize> = (0..n).collect();
    let mut scratch: Vec<usize> = vec![0; n];
    // Ranges of `idx` whose ids share their first `depth` bytes, still to be ordered.
    let mut work: Vec<(usize, usize, usize)> = vec![(0, n, 0)];
    while let Some((lo, hi, mut depth)) = work.pop() {
        let part = &mut idx[lo..hi];
        if part.len() <= SMALL {
            part.sort_unstable_by(|&a, &b| tail(ids, a, depth).cmp(tail(ids, b, depth)));
            continue;
        }
        // Skip the bytes every id of the group shares, at most `CHUNK` per look, so that a
        // group whose ids part early costs at most `CHUNK` bytes per id here.
        loop {
            let first = tail(ids, part[0], depth);
            let mut shared = first.len().min(CHUNK);
            for &i in &part[1..] {
                if shared == 0 {
                    break;
                }
                shared = common_prefix(&first[..shared], tail(ids, i, depth));
            }
            depth += shared;
            if shared < CHUNK {
                break;
            }
        }
        // Bucket 0: the id ends here; bucket b + 1: the next byte is b.
        let bucket = |i: usize| ids[i].get(depth).map_or(0, |&b| usize::from(b) + 1);
        let mut start = [0usize; 258];
        for &i in part.iter() {
            start[bucket(i) + 1] += 1;
        }
        for b in 1..start.len() {
            start[b] += start[b - 1];
        }
        let out = &mut scratch[lo..hi];
        let mut next = start;
        for &i in part.iter() {
            let b = bucket(i);
            out[next[b]] = i;
            next[b] += 1;
        }
        part.copy_from_slice(out);
        // Ids are compared as wholes, so at most one ends here in a set of distinct ids;
        // bucket 0 is in place either way. The others go one byte deeper.
        for b in 1..257 {
            let (s, e) = (start[b], start[b + 1]);
            if e - s > 1 {
                work.push((lo + s, lo + e, depth + 1));
            }
        }
    }
    idx
}

/// Id `i` from byte `depth` on (empty past its end).
fn tail<'a>(ids: &[&'a [u8]], i: usize, depth: usize) -> &'a [u8] {
    ids[i].get(depth..).unwrap_or_default()
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The positions `0..keys.len()` ordered by key, ties in the order `by_id` lists them
/// (each position once): groups the positions by distinct key in a `BTreeMap`, so the cost
/// is O(n log k) key comparisons for k distinct keys.
pub(super) fn by_key_then<K: Ord + Copy>(keys: &[K], by_id: &[usize]) -> Vec<usize> {
    let mut groups: BTreeMap<K, Vec<usize>> = BTreeMap::new();
    for &i in by_id {
        groups.entry(keys[i]).or_default().push(i);
    }
    let mut out = Vec::with_capacity(keys.len());
    for group in groups.into_values() {
        out.extend(group);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic generator (xorshift), so that failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn check(ids: &[Vec<u8>]) {
        let refs: Vec<&[u8]> = ids.iter().map(Vec::as_slice).collect();
        let got = id_order(&refs);
        let mut want: Vec<usize> = (0..ids.len()).collect();
        want.sort_by(|&a, &b| ids[a].cmp(&ids[b]).then(a.cmp(&b)));
        let got_ids: Vec<&[u8]> = got.iter().map(|&i| refs[i]).collect();
        let want_ids: Vec<&[u8]> = want.iter().map(|&i| refs[i]).collect();
        assert_eq!(got_ids, want_ids);
        let mut seen = got.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..ids.len()).collect::<Vec<_>>(), "each position exactly once");
    }

    /// Against the standard library's order, on ids that share long prefixes, are
    /// prefixes of one another, are empty, repeat, and use every byte value (0 and 255
    /// included), in groups above and below the small-group cut-off.
    #[test]
    fn id_order_is_byte_order() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..300 {
            let n = (rng.next() % 400) as usize + usize::from(round % 7 == 0) * 2000;
            let alphabet: &[u8] = match round % 3 {
                0 => b"ab",
                1 => b"cu128-static-x86_64-linux-0123456789",
                _ => &[0, 1, 127, 128, 254, 255],
            };
            let prefix = b"cu128-static-x86_64-linux-".repeat((round % 4) as usize);
            let ids: Vec<Vec<u8>> = (0..n)
                .map(|_| {
                    let len = (rng.next() % 12) as usize;
                    let mut id = if rng.next().is_multiple_of(2) { prefix.clone() } else { Vec::new() };
                    id.extend((0..len).map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize]));
                    id
                })
                .collect();
            check(&ids);
        }
    }

    /// A chain of ids each a prefix of the next (`a`, `aa`, …), longer than any stack
    /// would allow one recursion per byte.
    #[test]
    fn id_order_handles_deep_prefix_chains() {
        let ids: Vec<Vec<u8>> = (0..1000).rev().map(|n| vec![b'a'; n]).collect();
        check(&ids);
        let ids: Vec<Vec<u8>> = (0..1000).map(|n| [vec![b'a'; n], vec![b'b']].concat()).collect();
        check(&ids);
        check(&[]);
        check(&[b"x".to_vec()]);
    }

    #[test]
    fn by_key_then_keeps_the_given_order_within_a_key() {
        let keys = [3, 1, 3, 2, 1, 3];
        let by_id = [5, 4, 3, 2, 1, 0];
        assert_eq!(by_key_then(&keys, &by_id), vec![4, 1, 3, 5, 2, 0]);
    }
}
