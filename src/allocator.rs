//! The static (musl) binary's allocator: blocks under 64 KiB from dlmalloc, rust-lang's pure-Rust
//! port (std's allocator on wasm), behind std's const `Mutex`; larger ones from musl's malloc.
//!
//! musl's malloc maps and unmaps a group of slots at every turn (`drainit -- /bin/true`: 131 mmap
//! and 111 munmap calls): dlmalloc takes its memory in 64 KiB segments and keeps it (21 and 6).
//! But dlmalloc never gives back memory below the top of its heap, and trims the top only past
//! 2 MiB: large blocks (a hostile client's header buffers) go to musl, which maps each apart and
//! unmaps it when freed. What a burst of probe connections leaves resident is dlmalloc's: the
//! blocks that churn at start-up are the ones the burst grows (footprint bench: +0.24 MB after the
//! probe load; +0.29 MB with dlmalloc for everything; +0.03 MB with musl from 1 KiB, which brings
//! the start-up churn back).
//!
//! Fork: drainit forks only to exec the app, and between the two runs std's spawn path and a
//! `pre_exec` hook (`tcsetpgrp`), neither of which allocates. Keep it so: a lock held by another
//! thread at the fork would never be released in the child.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::{Mutex, MutexGuard, PoisonError};

use dlmalloc::Dlmalloc;

/// Blocks under this size come from dlmalloc.
const SMALL: usize = 64 * 1024;

pub struct Allocator {
    small: Mutex<Dlmalloc>,
}

fn is_small(size: usize) -> bool {
    size < SMALL
}

impl Allocator {
    pub const fn new() -> Allocator {
        Allocator {
            small: Mutex::new(Dlmalloc::new()),
        }
    }

    fn small(&self) -> MutexGuard<'_, Dlmalloc> {
        // dlmalloc does not panic while the lock is held; a poisoned lock is still consistent.
        self.small.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// SAFETY: a block's size (the caller's layout) says which allocator it came from.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_small(layout.size()) {
            // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
            unsafe { self.small().malloc(layout.size(), layout.align()) }
        } else {
            // SAFETY: as above.
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_small(layout.size()) {
            // SAFETY: the caller's layout, as GlobalAlloc::alloc_zeroed requires.
            unsafe { self.small().calloc(layout.size(), layout.align()) }
        } else {
            // SAFETY: as above.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_small(layout.size()) {
            // SAFETY: ptr came from dlmalloc with this layout, as GlobalAlloc::dealloc requires.
            unsafe { self.small().free(ptr, layout.size(), layout.align()) }
        } else {
            // SAFETY: ptr came from musl with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let was_small = is_small(layout.size());
        match (was_small, is_small(new_size)) {
            // SAFETY: ptr came from dlmalloc with this layout, as GlobalAlloc::realloc requires.
            (true, true) => unsafe {
                self.small()
                    .realloc(ptr, layout.size(), layout.align(), new_size)
            },
            // SAFETY: ptr came from musl with this layout.
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            _ => {
                // SAFETY: GlobalAlloc::realloc requires new_size to make a valid layout.
                let new_layout =
                    unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
                // SAFETY: a fresh block from the other allocator, then the old one freed by its own.
                unsafe {
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}
