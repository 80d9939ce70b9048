//! Keel's global allocator: mimalloc, called so that an ordinary allocation takes its fast path.
//!
//! The `mimalloc` crate's `GlobalAlloc` passes every request to `mi_malloc_aligned`, with the
//! type's alignment. For a block size that is not a power of two, mimalloc's aligned entry
//! point leaves its fast path whenever the size class's free list is empty, and then
//! over-allocates from the next size class up; since that never refills the first size
//! class's free list, a program that allocates and frees the same type over and over (a
//! server's per-call future, say) pays the slow path on nearly every allocation. Measured
//! under callgrind on `keel serve` at 1 KiB × 64 calls in flight, the allocator took about 330
//! instructions per call that way (see docs/benchmarks.md).
//!
//! Every mimalloc block is at least word-aligned: its size classes are multiples of the word
//! size and its pages start aligned. So a request aligned to a word or less goes to the plain
//! `mi_malloc` family, and only a larger alignment to the aligned one.
//!
//! ```
//! #[global_allocator]
//! static ALLOCATOR: keel_alloc::Allocator = keel_alloc::Allocator;
//!
//! let names: Vec<String> = (0..100).map(|i| format!("instance-{i}")).collect();
//! assert_eq!(names[42], "instance-42");
//! ```

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every mimalloc block has: a machine word.
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc as a global allocator; see the crate's documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allocator;

// SAFETY: every method returns memory from mimalloc that satisfies `layout` (a plain mimalloc
// block is word-aligned, so the plain calls are used only for alignments of a word or less),
// or null on failure; `dealloc` and `realloc` receive only pointers this allocator returned,
// which `mi_free` and `mi_realloc*` accept whichever entry point allocated them.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `allocate` requires.
        unsafe { allocate(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `allocate` requires.
        unsafe { allocate(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract), so from mimalloc.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract); the
        // result keeps `layout`'s alignment as in `alloc`.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

/// Allocates `layout` with `plain(size)` when a word's alignment is enough (every mimalloc
/// block has it), with `aligned(size, align)` otherwise.
///
/// # Safety
/// `plain` and `aligned` are mimalloc's matching pair (`mi_malloc` and `mi_malloc_aligned`,
/// or the zeroing pair), which accept any size and, as `Layout` guarantees, a power-of-two
/// alignment.
#[inline]
unsafe fn allocate(
    layout: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    // SAFETY: the caller passes mimalloc's functions, which are sound for any size.
    unsafe {
        if layout.align() <= WORD {
            plain(layout.size()).cast()
        } else {
            aligned(layout.size(), layout.align()).cast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Allocates, writes, grows and frees blocks of many sizes and alignments, checking each
    /// pointer's alignment and that the contents survive a `realloc`.
    #[test]
    fn blocks_have_their_layouts_alignment_and_keep_their_contents() {
        let a = Allocator;
        for align in [1usize, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [1usize, 3, 8, 24, 40, 48, 100, 168, 200, 1000, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).expect("valid layout");
                // SAFETY: a non-zero-size layout; the block is used within its size and freed
                // once, by the allocator that made it.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    for i in 0..size {
                        p.add(i).write(i as u8);
                    }
                    let q = a.realloc(p, layout, size * 3);
                    assert!(!q.is_null());
                    assert_eq!(q as usize % align, 0, "realloc: size {size} align {align}");
                    for i in 0..size {
                        assert_eq!(q.add(i).read(), i as u8);
                    }
                    a.dealloc(q, Layout::from_size_align(size * 3, align).expect("valid"));

                    let z = a.alloc_zeroed(layout);
                    assert!(!z.is_null());
                    assert_eq!(z as usize % align, 0, "zeroed: size {size} align {align}");
                    assert!((0..size).all(|i| z.add(i).read() == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
