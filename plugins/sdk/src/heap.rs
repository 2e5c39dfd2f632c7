//! The allocator of plugins built without WASI (`wasm32-unknown-unknown`).
//!
//! Every call runs in a fresh instance, so the heap starts empty each time.
//! Rust's allocator on that target asks for its first block with
//! `memory.grow`, and growing a memory makes the host change the protection
//! of the pages on every call (and change it back when the slot is reused):
//! api-key measured 15.7 µs a call that way, 10.2 without. wasi-libc's
//! allocator, on `wasm32-wasip2`, avoids that by using the rest of the
//! initial memory first.
//! This does the same: allocations are carved, in order, from the initial
//! memory above the module's data (`__heap_base` up to the memory's size at
//! the first allocation; `plugins/.cargo/config.toml` sizes it), and only
//! what does not fit goes to Rust's allocator, which grows the memory.
//!
//! Memory freed in that first region is reused only when it was the newest
//! allocation (a `String` or `Vec` that grows at the end, a temporary freed
//! right away); the rest is given back when the call ends and the instance
//! goes. A plugin that works on large bodies spills into the growing
//! allocator and frees there as usual.

use std::cell::Cell;

/// The region allocations are carved from, as addresses: the arithmetic of
/// the allocator, apart from the memory it hands out.
#[derive(Debug)]
pub(crate) struct Region {
    /// The first free address.
    next: Cell<usize>,
    /// One past the region's last address.
    end: Cell<usize>,
    /// The newest allocation still live, if any (0: none): the only one that
    /// can be given back or grown in place.
    newest: Cell<usize>,
}

impl Region {
    pub(crate) const fn empty() -> Region {
        Region {
            next: Cell::new(0),
            end: Cell::new(0),
            newest: Cell::new(0),
        }
    }

    /// Whether the region has been given its bounds.
    pub(crate) fn is_set(&self) -> bool {
        self.end.get() != 0
    }

    pub(crate) fn set(&self, start: usize, end: usize) {
        self.next.set(start);
        self.end.set(end.max(start));
        self.newest.set(0);
    }

    pub(crate) fn contains(&self, addr: usize) -> bool {
        addr < self.end.get()
    }

    /// The address of `size` bytes aligned to `align` (a power of two), or
    /// `None` when they do not fit.
    pub(crate) fn take(&self, size: usize, align: usize) -> Option<usize> {
        let start = self.next.get().checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(size)?;
        if end > self.end.get() {
            return None;
        }
        self.next.set(end);
        self.newest.set(start);
        Some(start)
    }

    /// Frees the allocation at `addr`; only the newest one is reused.
    pub(crate) fn give_back(&self, addr: usize) {
        if addr == self.newest.get() {
            self.next.set(addr);
            self.newest.set(0);
        }
    }

    /// Resizes the newest allocation at `addr` to `new_size` where it
    /// stands; false when `addr` is not the newest or the bytes do not fit.
    pub(crate) fn resize_in_place(&self, addr: usize, new_size: usize) -> bool {
        match addr.checked_add(new_size) {
            Some(end) if addr == self.newest.get() && end <= self.end.get() => {
                self.next.set(end);
                true
            }
            _ => false,
        }
    }
}

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
mod global {
    // The allocator itself has to be unsafe code: `GlobalAlloc` is an unsafe
    // trait, and the region's bounds come from a linker symbol.
    #![allow(unsafe_code)]

    use super::Region;
    use std::alloc::{GlobalAlloc, Layout, System};

    #[cfg(target_feature = "atomics")]
    compile_error!("the plugin allocator assumes a single-threaded module (no atomics)");

    struct InitialMemoryFirst(Region);

    // SAFETY: without the atomics feature a wasm module has one thread.
    unsafe impl Sync for InitialMemoryFirst {}

    impl InitialMemoryFirst {
        fn region(&self) -> &Region {
            if !self.0.is_set() {
                unsafe extern "C" {
                    /// Where the linker put the end of the module's data.
                    static __heap_base: u8;
                }
                let start = &raw const __heap_base as usize;
                let end = core::arch::wasm32::memory_size(0) * 65536;
                self.0.set(start, end);
            }
            &self.0
        }
    }

    // SAFETY: every address handed out lies in the initial memory above the
    // module's data, in bytes no other allocation holds (the region only
    // moves forward, except to give back the newest allocation), or comes
    // from `System`; each free and resize goes to where the address came
    // from.
    unsafe impl GlobalAlloc for InitialMemoryFirst {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            match self.region().take(layout.size(), layout.align()) {
                Some(addr) => addr as *mut u8,
                // SAFETY: the caller's layout, passed on.
                None => unsafe { System.alloc(layout) },
            }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            let region = self.region();
            if region.contains(ptr as usize) {
                region.give_back(ptr as usize);
            } else {
                // SAFETY: not in the region, so `System` gave it out.
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let region = self.region();
            if !region.contains(ptr as usize) {
                // SAFETY: not in the region, so `System` gave it out.
                return unsafe { System.realloc(ptr, layout, new_size) };
            }
            if region.resize_in_place(ptr as usize, new_size) {
                return ptr;
            }
            // SAFETY: `new_size` is non-zero and, rounded up to the
            // alignment, fits an isize: the contract of `realloc`.
            let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            // SAFETY: a valid layout, as above.
            let new = unsafe { self.alloc(new_layout) };
            if !new.is_null() {
                // SAFETY: both blocks are live, distinct and at least this long.
                unsafe { core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
                region.give_back(ptr as usize);
            }
            new
        }
    }

    #[global_allocator]
    static ALLOCATOR: InitialMemoryFirst = InitialMemoryFirst(Region::empty());
}

#[cfg(test)]
mod tests {
    use super::Region;

    fn region(start: usize, end: usize) -> Region {
        let r = Region::empty();
        r.set(start, end);
        r
    }

    #[test]
    fn allocations_are_aligned_and_do_not_overlap() {
        let r = region(1001, 2000);
        let a = r.take(10, 8).unwrap();
        let b = r.take(3, 1).unwrap();
        let c = r.take(16, 16).unwrap();
        assert_eq!(a, 1008);
        assert_eq!(b, 1018);
        assert_eq!(c, 1024);
        assert!(r.contains(c) && !r.contains(2000));
    }

    #[test]
    fn what_does_not_fit_is_refused_and_the_region_stays_usable() {
        let r = region(1000, 1100);
        assert_eq!(r.take(101, 1), None);
        assert_eq!(r.take(usize::MAX - 8, 1), None);
        assert_eq!(r.take(8, usize::MAX / 2 + 1), None);
        assert_eq!(r.take(100, 1), Some(1000));
        assert_eq!(r.take(1, 1), None);
    }

    #[test]
    fn only_the_newest_allocation_is_reused() {
        let r = region(1000, 2000);
        let a = r.take(100, 1).unwrap();
        let b = r.take(100, 1).unwrap();
        r.give_back(a);
        assert_eq!(
            r.take(1, 1),
            Some(1200),
            "a freed older block is not reused"
        );
        let c = r.take(50, 1).unwrap();
        r.give_back(c);
        assert_eq!(r.take(50, 1), Some(c), "the newest block is");
        let _ = b;
    }

    #[test]
    fn the_newest_allocation_grows_and_shrinks_in_place() {
        let r = region(1000, 1200);
        let a = r.take(10, 1).unwrap();
        let b = r.take(10, 1).unwrap();
        assert!(!r.resize_in_place(a, 20), "an older block cannot grow");
        assert!(r.resize_in_place(b, 190));
        assert!(!r.resize_in_place(b, 191), "nor past the end");
        assert!(r.resize_in_place(b, 5));
        assert_eq!(r.take(1, 1), Some(1015));
    }

    #[test]
    fn an_empty_or_inverted_region_hands_out_nothing() {
        let r = region(5000, 4000);
        assert!(r.is_set());
        assert_eq!(r.take(1, 1), None);
        assert!(!Region::empty().is_set());
    }
}
