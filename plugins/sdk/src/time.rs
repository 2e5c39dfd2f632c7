//! The wall clock, as WASI gives it to a plugin.

/// Seconds since the Unix epoch; 0 if the clock reads before 1970.
///
/// Plugins that check timestamps (signatures, token expiry) read the clock
/// here once per call and pass the value into their logic, so that the logic
/// stays a pure function that tests can drive with any time.
pub fn unix_seconds() -> u64 {
    imp::unix_seconds()
}

#[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
mod imp {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn unix_seconds() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs())
    }
}

/// Built without WASI, the standard library has no clock (`SystemTime::now`
/// panics there): WASI's wall clock is imported on its own, the one WASI
/// interface such a plugin then has.
#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
mod imp {
    #[allow(missing_docs, clippy::all)]
    mod bindings {
        wit_bindgen::generate!({
            inline: "
                package execd:sdk-clock;
                world clock {
                    import wasi:clocks/wall-clock@0.2.6;
                }
                package wasi:clocks@0.2.6 {
                    interface wall-clock {
                        record datetime { seconds: u64, nanoseconds: u32 }
                        now: func() -> datetime;
                        resolution: func() -> datetime;
                    }
                }
            ",
            world: "execd:sdk-clock/clock",
            generate_all,
        });
    }

    pub fn unix_seconds() -> u64 {
        bindings::wasi::clocks::wall_clock::now().seconds
    }
}
