//! The static (musl) binary's allocator: blocks under 64 KiB from dlmalloc, rust-lang's pure-Rust
//! port (std's allocator on wasm), in a fixed arena, behind std's const `Mutex`; larger blocks,
//! and any block once the arena is full, from musl's malloc.
//!
//! musl's malloc maps and unmaps a group of slots at every turn (`drainit -- /bin/true`: 131 mmap
//! and 111 munmap calls); dlmalloc keeps what it was given, which makes start-up fast. But it
//! never gives back memory below the top of its heap: whatever a burst of probe connections grew
//! would stay resident. So dlmalloc gets an arena about the size start-up needs (zeroed `.bss`:
//! pages cost nothing until touched) and cannot grow past it; musl takes the rest, and large
//! blocks (a hostile client's buffers), and returns them to the kernel when they are freed.
//! Within the arena, a freed block of 16 KiB or more gives its inner pages back too: start-up's
//! passing peaks (clap's parse, signal-hook copying its table at each registration) need not stay
//! resident for good.
//!
//! Fork: drainit forks only to exec the app, and between the two runs std's spawn path and a
//! `pre_exec` hook (`tcsetpgrp`), neither of which allocates. Keep it so: a lock held by another
//! thread at the fork would never be released in the child.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use dlmalloc::Dlmalloc;

/// Blocks under this size may come from dlmalloc.
const SMALL: usize = 64 * 1024;

/// dlmalloc's whole heap. Start-up's peak reaches 132-148 KiB of it and leaves about 128 KiB
/// resident at rest (`drainit -- sleep`, sidecar, JSON logs, watched drains; x86_64); the two
/// sock_diag receive buffers (32 KiB each, mostly never touched) come after. A burst of probe
/// connections can leave at most the rest resident: anything beyond goes to musl, which gives it
/// back.
const ARENA: usize = 192 * 1024;

const PAGE: usize = 4096;

#[repr(C, align(4096))]
struct ArenaBytes(UnsafeCell<[u8; ARENA]>);

// SAFETY: the bytes are only reached through dlmalloc, under the allocator's lock.
unsafe impl Sync for ArenaBytes {}

static ARENA_BYTES: ArenaBytes = ArenaBytes(UnsafeCell::new([0; ARENA]));

fn arena_base() -> usize {
    ARENA_BYTES.0.get() as usize
}

fn in_arena(ptr: *mut u8) -> bool {
    (ptr as usize).wrapping_sub(arena_base()) < ARENA
}

/// dlmalloc's system allocator: the arena, handed out once, front to back.
struct Arena {
    used: Cell<usize>,
}

// SAFETY: hands out each byte of the arena at most once and never takes any back.
unsafe impl dlmalloc::Allocator for Arena {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        let used = self.used.get();
        if size > ARENA - used {
            return (std::ptr::null_mut(), 0, 0);
        }
        self.used.set(used + size);
        ((arena_base() + used) as *mut u8, size, 0)
    }

    fn remap(&self, _ptr: *mut u8, _old: usize, _new: usize, _can_move: bool) -> *mut u8 {
        std::ptr::null_mut()
    }

    fn free_part(&self, _ptr: *mut u8, _old: usize, _new: usize) -> bool {
        false
    }

    fn free(&self, _ptr: *mut u8, _size: usize) -> bool {
        false
    }

    fn can_release_part(&self, _flags: u32) -> bool {
        false
    }

    fn allocates_zeros(&self) -> bool {
        true
    }

    fn page_size(&self) -> usize {
        PAGE
    }
}

/// Freed blocks this large give their whole inner pages back to the kernel: clap's argument
/// lists, signal-hook's last table copies. Below it the syscall and the fault that brings a page
/// back cost more than the page is worth: from 8 KiB on, `drainit -- /bin/true` made 92 madvise
/// calls and started 0.5 ms slower; from 16 KiB on, 14 calls, no measurable delay.
const RELEASE_MIN: usize = 16 * 1024;

/// Gives the kernel the whole pages inside a block dlmalloc has just freed. dlmalloc keeps a free
/// chunk's bookkeeping in its first bytes (a tree chunk's links, 44 bytes) and the next chunk's
/// header at its end; the pages in between are unused until dlmalloc hands the memory out again,
/// and then come back zeroed, on which dlmalloc never relies (it clears a calloc itself). Called
/// with the lock held, right after the free: once it is released another thread may be given
/// those pages.
fn release_inside(ptr: *mut u8, size: usize) {
    const FREE_CHUNK_LINKS: usize = 64;
    const NEXT_CHUNK_FOOT: usize = 16;
    if size < RELEASE_MIN {
        return;
    }
    // The kernel's page, not PAGE: arm64 kernels may use 16 or 64 KiB pages, and madvise
    // rounds its length up to them, past the block, if the start happens to be aligned.
    let page = kernel_page_size();
    let start = (ptr as usize + FREE_CHUNK_LINKS).next_multiple_of(page);
    let end = (ptr as usize + size - NEXT_CHUNK_FOOT) / page * page;
    if start < end {
        // SAFETY: whole pages inside a block of the arena that dlmalloc just freed and that no one
        // can be given while the lock is held; the arena is anonymous memory (.bss).
        unsafe {
            nix::libc::madvise(start as *mut _, end - start, nix::libc::MADV_DONTNEED);
        }
    }
}

/// The kernel's page size, read once (musl answers from the auxiliary vector: no allocation).
fn kernel_page_size() -> usize {
    static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);
    let cached = PAGE_SIZE.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    // SAFETY: sysconf only reads a value.
    let read = unsafe { nix::libc::sysconf(nix::libc::_SC_PAGESIZE) };
    // Unknown: a page larger than any arena block holds, so nothing is released.
    let page = match usize::try_from(read) {
        Ok(page) if page > 0 => page,
        _ => SMALL,
    };
    PAGE_SIZE.store(page, Ordering::Relaxed);
    page
}

pub struct Allocator {
    small: Mutex<Dlmalloc<Arena>>,
}

impl Allocator {
    pub const fn new() -> Allocator {
        let mut heap = Dlmalloc::new_with_allocator(Arena { used: Cell::new(0) });
        // Segments of one page: the arena is used to its last page.
        assert!(heap.set_granularity(PAGE));
        Allocator {
            small: Mutex::new(heap),
        }
    }

    fn small(&self) -> MutexGuard<'_, Dlmalloc<Arena>> {
        // dlmalloc does not panic while the lock is held; a poisoned lock is still consistent.
        self.small.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives an arena block back to dlmalloc, and its inner pages to the kernel.
    ///
    /// # Safety
    /// `ptr` came from dlmalloc with `layout`.
    unsafe fn free_small(&self, ptr: *mut u8, layout: Layout) {
        let mut small = self.small();
        // SAFETY: the caller's promise.
        unsafe { small.free(ptr, layout.size(), layout.align()) };
        release_inside(ptr, layout.size());
    }

    /// From dlmalloc if small and the arena has room, else from musl.
    unsafe fn allocate(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        if layout.size() < SMALL {
            let mut small = self.small();
            // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
            let ptr = unsafe {
                if zeroed {
                    small.calloc(layout.size(), layout.align())
                } else {
                    small.malloc(layout.size(), layout.align())
                }
            };
            if !ptr.is_null() {
                return ptr;
            }
        }
        // SAFETY: as above.
        unsafe {
            if zeroed {
                System.alloc_zeroed(layout)
            } else {
                System.alloc(layout)
            }
        }
    }
}

// SAFETY: a block's address says which allocator it came from: the arena is dlmalloc's alone.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout.
        unsafe { self.allocate(layout, false) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout.
        unsafe { self.allocate(layout, true) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if in_arena(ptr) {
            // SAFETY: ptr came from dlmalloc with this layout, as GlobalAlloc::dealloc requires.
            unsafe { self.free_small(ptr, layout) }
        } else {
            // SAFETY: ptr came from musl with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !in_arena(ptr) {
            // SAFETY: ptr came from musl with this layout, as GlobalAlloc::realloc requires.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        if new_size < SMALL {
            let mut small = self.small();
            // SAFETY: ptr came from dlmalloc with this layout.
            let new = unsafe { small.realloc(ptr, layout.size(), layout.align(), new_size) };
            if !new.is_null() {
                if new != ptr {
                    // Moved: the old block is free.
                    release_inside(ptr, layout.size());
                }
                return new;
            }
        }
        // SAFETY: GlobalAlloc::realloc requires new_size to make a valid layout with this align.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: a fresh block from musl; the old one, still ours, freed by dlmalloc.
        unsafe {
            let new = System.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.free_small(ptr, layout);
            }
            new
        }
    }
}
