//! Wall-clock time as the records and reports store it.

/// Milliseconds since the Unix epoch. A clock set before 1970 reads as 0
/// (records then show "unknown" rather than a negative age).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

/// Whole milliseconds of `d` as the records store them (saturating: no
/// duration measured here comes near 2^64 ms).
pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn after_this_code_was_written() {
        // 2024-01-01T00:00:00Z
        assert!(super::unix_ms() > 1_704_067_200_000);
    }
}
