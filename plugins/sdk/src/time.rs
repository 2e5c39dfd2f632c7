//! The wall clock, as WASI gives it to a plugin.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; 0 if the clock reads before 1970.
///
/// Plugins that check timestamps (signatures, token expiry) read the clock
/// here once per call and pass the value into their logic, so that the logic
/// stays a pure function that tests can drive with any time.
pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}
