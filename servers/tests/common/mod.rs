//! What the integration tests share.

/// `len` pseudo-random bytes from `seed`, never zero: unwritten (or
/// discarded) space, which reads as zero, is never taken for written data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}
