//! The one 64-bit mixer: sticky balancing hashes client addresses with it, the recycling
//! limits derive each worker's jitter from it.

/// splitmix64's finalizer: a fast, well-spread 64-bit mix (not for secrets).
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_splitmix64() {
        // The first outputs of splitmix64 seeded with 0 (state advanced by the constant).
        assert_eq!(mix64(0), 0xe220_a839_7b1d_cdaf);
        assert_ne!(mix64(1), mix64(2));
    }
}
