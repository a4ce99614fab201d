//! The C memory functions the compiler emits calls to. There is no libc, and the versions in
//! `compiler_builtins` may use SSE. String instructions keep them to one instruction per call;
//! the comparisons read through `read_volatile` so LLVM cannot recognise the loop as a
//! `memcmp`/`bcmp` idiom and turn it into a call to itself.

use core::arch::asm;
use core::ptr::read_volatile;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller passes valid, non-overlapping buffers of n bytes.
    unsafe {
        asm!("rep movsb", inout("rdi") dest => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags));
    }
    dest
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest is below src or past its end: a forward copy never reads a byte it wrote.
        // SAFETY: as for memcpy.
        unsafe { memcpy(dest, src, n) };
    } else if n > 0 {
        // SAFETY: the caller passes valid buffers of n bytes; copy backwards from the last byte.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rdi") dest.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                 inout("rcx") n => _, options(nostack));
        }
    }
    dest
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller passes a valid buffer of n bytes.
    unsafe {
        asm!("rep stosb", inout("rdi") dest => _, inout("rcx") n => _, in("al") value as u8,
             options(nostack, preserves_flags));
    }
    dest
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller passes valid buffers of n bytes.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
