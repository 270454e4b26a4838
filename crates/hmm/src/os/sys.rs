//! Kernel ABI: ioctl numbers, flag values and structure layouts.
//!
//! Structures come from `linux-raw-sys`, generated from the kernel's uapi headers.
//! The ioctl numbers and mode flags it lacks (those the uapi headers define
//! through macros bindgen cannot evaluate) are written here by hand, and every
//! number and layout is checked at compile time: against `linux-raw-sys` where it
//! has the value, and against the kernel's documented sizes and offsets otherwise.
//! A mismatch is a build failure, never a wrong system call.

use core::mem::{offset_of, size_of};

use linux_raw_sys::general as g;
use rustix::ioctl::{Opcode, opcode};

pub(crate) use g::{
    page_region, pm_scan_arg, procmap_query, uffd_msg, uffdio_api, uffdio_continue, uffdio_copy,
    uffdio_move, uffdio_poison, uffdio_range, uffdio_register, uffdio_writeprotect,
    uffdio_zeropage,
};

/// `UFFDIO` ioctl type byte (`0xAA`).
const UFFDIO: u8 = 0xAA;

pub(crate) const UFFDIO_API: Opcode =
    opcode::read_write::<uffdio_api>(UFFDIO, g::_UFFDIO_API as u8);
pub(crate) const UFFDIO_REGISTER: Opcode =
    opcode::read_write::<uffdio_register>(UFFDIO, g::_UFFDIO_REGISTER as u8);
pub(crate) const UFFDIO_UNREGISTER: Opcode =
    opcode::read::<uffdio_range>(UFFDIO, g::_UFFDIO_UNREGISTER as u8);
pub(crate) const UFFDIO_WAKE: Opcode = opcode::read::<uffdio_range>(UFFDIO, g::_UFFDIO_WAKE as u8);
pub(crate) const UFFDIO_COPY: Opcode =
    opcode::read_write::<uffdio_copy>(UFFDIO, g::_UFFDIO_COPY as u8);
pub(crate) const UFFDIO_ZEROPAGE: Opcode =
    opcode::read_write::<uffdio_zeropage>(UFFDIO, g::_UFFDIO_ZEROPAGE as u8);
pub(crate) const UFFDIO_MOVE: Opcode =
    opcode::read_write::<uffdio_move>(UFFDIO, g::_UFFDIO_MOVE as u8);
pub(crate) const UFFDIO_WRITEPROTECT: Opcode =
    opcode::read_write::<uffdio_writeprotect>(UFFDIO, g::_UFFDIO_WRITEPROTECT as u8);
pub(crate) const UFFDIO_CONTINUE: Opcode =
    opcode::read_write::<uffdio_continue>(UFFDIO, g::_UFFDIO_CONTINUE as u8);
pub(crate) const UFFDIO_POISON: Opcode =
    opcode::read_write::<uffdio_poison>(UFFDIO, g::_UFFDIO_POISON as u8);
/// `USERFAULTFD_IOC_NEW`: `_IO(USERFAULTFD_IOC, 0x00)` on `/dev/userfaultfd`.
pub(crate) const USERFAULTFD_IOC_NEW: Opcode = opcode::none(g::USERFAULTFD_IOC as u8, 0x00);
/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)` on `/proc/<pid>/pagemap`.
pub(crate) const PAGEMAP_SCAN: Opcode = opcode::read_write::<pm_scan_arg>(b'f', 16);
/// `PROCMAP_QUERY`: `_IOWR('f', 17, struct procmap_query)` on `/proc/<pid>/maps`.
pub(crate) const PROCMAP_QUERY: Opcode = opcode::read_write::<procmap_query>(b'f', 17);

// Values the uapi header defines as `((__u64)1 << n)`, which bindgen skips.
pub(crate) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub(crate) const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
pub(crate) const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
pub(crate) const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
pub(crate) const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;
pub(crate) const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
pub(crate) const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;
pub(crate) const UFFDIO_COPY_MODE_DONTWAKE: u64 = g::UFFDIO_COPY_MODE_DONTWAKE as u64;
pub(crate) const UFFDIO_COPY_MODE_WP: u64 = g::UFFDIO_COPY_MODE_WP as u64;
pub(crate) const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = g::UFFDIO_ZEROPAGE_MODE_DONTWAKE as u64;

/// The API version `UFFDIO_API` expects.
pub(crate) const UFFD_API: u64 = g::UFFD_API as u64;

// ---- compile-time checks: ioctl numbers ---------------------------------------

macro_rules! same {
    ($ours:expr, $theirs:expr) => {
        const _: () = assert!($ours == $theirs as Opcode, "ioctl number differs from the kernel's");
    };
}

same!(UFFDIO_API, linux_raw_sys::ioctl::UFFDIO_API);
same!(UFFDIO_REGISTER, linux_raw_sys::ioctl::UFFDIO_REGISTER);
same!(UFFDIO_UNREGISTER, linux_raw_sys::ioctl::UFFDIO_UNREGISTER);
same!(UFFDIO_WAKE, linux_raw_sys::ioctl::UFFDIO_WAKE);
same!(UFFDIO_COPY, linux_raw_sys::ioctl::UFFDIO_COPY);
same!(UFFDIO_ZEROPAGE, linux_raw_sys::ioctl::UFFDIO_ZEROPAGE);
same!(UFFDIO_WRITEPROTECT, linux_raw_sys::ioctl::UFFDIO_WRITEPROTECT);
same!(UFFDIO_CONTINUE, linux_raw_sys::ioctl::UFFDIO_CONTINUE);
// Not in linux-raw-sys: the values the kernel headers expand to on x86-64 and arm64
// (`_IOC(dir, type, nr, size)` = dir << 30 | size << 16 | type << 8 | nr).
same!(UFFDIO_MOVE, 0xC028_AA05_u32);
same!(UFFDIO_POISON, 0xC020_AA08_u32);
same!(USERFAULTFD_IOC_NEW, 0x0000_AA00_u32);
same!(PAGEMAP_SCAN, 0xC060_6610_u32);
same!(PROCMAP_QUERY, 0xC068_6611_u32);

// ---- compile-time checks: structure layouts ------------------------------------

macro_rules! layout {
    ($t:ty, size $size:expr, $($field:ident @ $off:expr),* $(,)?) => {
        const _: () = assert!(size_of::<$t>() == $size, concat!("size of ", stringify!($t)));
        $(const _: () = assert!(
            offset_of!($t, $field) == $off,
            concat!("offset of ", stringify!($t), ".", stringify!($field))
        );)*
    };
}

layout!(uffd_msg, size 32, event @ 0, arg @ 8);
layout!(uffdio_api, size 24, api @ 0, features @ 8, ioctls @ 16);
layout!(uffdio_range, size 16, start @ 0, len @ 8);
layout!(uffdio_register, size 32, range @ 0, mode @ 16, ioctls @ 24);
layout!(uffdio_copy, size 40, dst @ 0, src @ 8, len @ 16, mode @ 24, copy @ 32);
layout!(uffdio_zeropage, size 32, range @ 0, mode @ 16, zeropage @ 24);
layout!(uffdio_writeprotect, size 24, range @ 0, mode @ 16);
layout!(uffdio_continue, size 32, range @ 0, mode @ 16, mapped @ 24);
layout!(uffdio_poison, size 32, range @ 0, mode @ 16, updated @ 24);
layout!(uffdio_move, size 40, dst @ 0, src @ 8, len @ 16, mode @ 24, move_ @ 32);
layout!(page_region, size 24, start @ 0, end @ 8, categories @ 16);
layout!(
    pm_scan_arg, size 96,
    size @ 0, flags @ 8, start @ 16, end @ 24, walk_end @ 32, vec @ 40, vec_len @ 48,
    max_pages @ 56, category_inverted @ 64, category_mask @ 72, category_anyof_mask @ 80,
    return_mask @ 88,
);
layout!(
    procmap_query, size 104,
    size @ 0, query_flags @ 8, query_addr @ 16, vma_start @ 24, vma_end @ 32, vma_flags @ 40,
    vma_page_size @ 48, vma_offset @ 56, inode @ 64, dev_major @ 72, dev_minor @ 76,
    vma_name_size @ 80, build_id_size @ 84, vma_name_addr @ 88, build_id_addr @ 96,
);
// The page-fault payload of `uffd_msg`: flags, address, then the thread id.
layout!(g::uffd_msg__bindgen_ty_1__bindgen_ty_1, size 24, flags @ 0, address @ 8, feat @ 16);
layout!(g::uffd_msg__bindgen_ty_1__bindgen_ty_3, size 24, from @ 0, to @ 8, len @ 16);
layout!(g::uffd_msg__bindgen_ty_1__bindgen_ty_4, size 16, start @ 0, end @ 8);

// Event numbers and feature bits the decoder relies on.
const _: () = assert!(g::UFFD_EVENT_PAGEFAULT == 0x12 && g::UFFD_EVENT_FORK == 0x13);
const _: () = assert!(g::UFFD_EVENT_REMAP == 0x14 && g::UFFD_EVENT_REMOVE == 0x15);
const _: () = assert!(g::UFFD_EVENT_UNMAP == 0x16);
const _: () = assert!(g::UFFD_FEATURE_MOVE == 1 << 16 && g::UFFD_FEATURE_POISON == 1 << 14);
const _: () = assert!(g::PAGE_IS_GUARD == 1 << 8 && g::PAGE_IS_WPALLOWED == 1);
