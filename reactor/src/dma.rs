//! DMA-able buffers: 4 KiB-aligned, from a hugepage-backed pool when
//! hugepages can be had (`MAP_HUGETLB`), otherwise from ordinary pages with
//! a logged warning. Freed buffers go back to lock-free per-size free lists,
//! so steady-state I/O allocates nothing from the system.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crossbeam_queue::SegQueue;

use crate::memory::{check_available, AllocError};

/// Alignment of every buffer (enough for O_DIRECT on any device here).
pub const ALIGN: usize = 4096;
const MIN_SHIFT: u32 = 12; // 4 KiB
const MAX_SHIFT: u32 = 21; // 2 MiB
const NCLASS: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
const HUGE_2M: usize = 2 << 20;

struct Pool {
    base: usize,
    size: usize,
    bump: AtomicUsize,
    free: [SegQueue<usize>; NCLASS],
    huge: bool,
    exhausted_warned: AtomicBool,
}

// SAFETY: the pool hands out disjoint ranges of one mapping that lives for
// the whole process; its bookkeeping is atomics and lock-free queues.
unsafe impl Sync for Pool {}
// SAFETY: as above; the base address is only an integer here.
unsafe impl Send for Pool {}

static POOL: OnceLock<Pool> = OnceLock::new();

fn mmap_anon(len: usize, huge: bool) -> Option<NonNull<u8>> {
    mmap_anon_flags(len, huge, 0)
}

fn mmap_anon_flags(len: usize, huge: bool, extra: libc::c_int) -> Option<NonNull<u8>> {
    // Hugepage mappings must reserve: with MAP_NORESERVE the map succeeds
    // even with no hugepages free and the first touch dies with SIGBUS.
    let flags = if huge {
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB
    } else {
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE
    } | extra;
    // SAFETY: anonymous private mapping; no existing memory is touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        None
    } else {
        NonNull::new(p as *mut u8)
    }
}

/// Map `len` bytes of ordinary pages and fault them all in (transparent
/// huge pages asked for first, so random I/O over a large RAM disk does not
/// miss the TLB on every 4 KiB page). On failure nothing stays mapped.
fn map_populated(len: usize) -> std::io::Result<NonNull<u8>> {
    let p = mmap_anon(len, false).ok_or_else(std::io::Error::last_os_error)?;
    let a = p.as_ptr() as *mut libc::c_void;
    // SAFETY: advice and prefault on the mapping just created.
    unsafe {
        libc::madvise(a, len, libc::MADV_HUGEPAGE);
        if libc::madvise(a, len, libc::MADV_POPULATE_WRITE) != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINVAL) {
                // Out of memory part way (the size was checked, but the
                // machine is shared): give back what was faulted in.
                libc::munmap(a, len);
                return Err(err);
            }
            // Kernels before 5.14: touch every page instead.
            std::ptr::write_bytes(p.as_ptr(), 0, len);
        }
    }
    Ok(p)
}

/// Set up the pool (first call wins; later runtimes in the same process
/// reuse it).
pub(crate) fn init(mem_size_mb: usize, try_huge: bool) {
    POOL.get_or_init(|| {
        let size = (mem_size_mb.max(2) << 20).next_multiple_of(HUGE_2M);
        let (ptr, huge) = match try_huge.then(|| mmap_anon(size, true)).flatten() {
            Some(p) => {
                tracing::info!(size_mb = size >> 20, "DMA pool on hugepages");
                (p, true)
            }
            None => {
                if try_huge {
                    tracing::warn!(
                        size_mb = size >> 20,
                        "no hugepages available (echo N > /proc/sys/vm/nr_hugepages); \
                         DMA pool falls back to ordinary pages"
                    );
                }
                let p = mmap_anon(size, false).expect("cannot map DMA pool memory");
                (p, false)
            }
        };
        Pool {
            base: ptr.as_ptr() as usize,
            size,
            bump: AtomicUsize::new(0),
            free: std::array::from_fn(|_| SegQueue::new()),
            huge,
            exhausted_warned: AtomicBool::new(false),
        }
    });
}

fn pool() -> &'static Pool {
    if POOL.get().is_none() {
        // Buffers wanted before any runtime started (tools, tests).
        init(64, false);
    }
    POOL.get().expect("initialised above")
}

/// Whether the pool lives on hugepages.
pub fn hugepages() -> bool {
    POOL.get().is_some_and(|p| p.huge)
}

enum Origin {
    Pool(u8),
    Heap(Layout),
    Map(usize),
}

/// An owned, 4 KiB-aligned, always-initialised byte buffer.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
    origin: Origin,
}

// SAFETY: DmaBuf uniquely owns its memory, like a Box<[u8]>.
unsafe impl Send for DmaBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    /// A buffer of `len` bytes. Contents are whatever the memory last held
    /// (never uninitialised); use [`DmaBuf::zeroed`] when it matters.
    /// Panics if the memory cannot be had: for buffers whose size the
    /// target chose (I/O, metadata); sizes from outside go through
    /// [`DmaBuf::try_new`].
    pub fn new(len: usize) -> DmaBuf {
        DmaBuf::alloc(len, false).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A buffer of `len` bytes, or an error when the machine cannot give
    /// that much: a size that came from outside (an RPC) must not abort the
    /// process nor get it OOM-killed later. Large buffers are checked
    /// against [`crate::memory::available_memory`] before anything is mapped.
    pub fn try_new(len: usize) -> Result<DmaBuf, AllocError> {
        DmaBuf::alloc(len, true)
    }

    fn alloc(len: usize, checked: bool) -> Result<DmaBuf, AllocError> {
        let len_nz = len.max(1);
        let shift = len_nz.next_power_of_two().trailing_zeros().max(MIN_SHIFT);
        if shift <= MAX_SHIFT {
            let p = pool();
            let class = (shift - MIN_SHIFT) as usize;
            let off = match p.free[class].pop() {
                Some(off) => Some(off),
                None => {
                    let sz = 1usize << shift;
                    // Carve from the bump region, keeping natural alignment.
                    let mut cur = p.bump.load(Ordering::Relaxed);
                    loop {
                        let start = cur.next_multiple_of(sz.min(HUGE_2M));
                        let end = start + sz;
                        if end > p.size {
                            break None;
                        }
                        match p.bump.compare_exchange_weak(
                            cur,
                            end,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        ) {
                            Ok(_) => break Some(start),
                            Err(c) => cur = c,
                        }
                    }
                }
            };
            if let Some(off) = off {
                return Ok(DmaBuf {
                    // SAFETY: off < size, inside the live mapping.
                    ptr: unsafe { NonNull::new_unchecked((p.base + off) as *mut u8) },
                    len,
                    origin: Origin::Pool(class as u8),
                });
            }
            if !p.exhausted_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    pool_mb = p.size >> 20,
                    "DMA pool exhausted; further buffers come from the heap (raise -s)"
                );
            }
            let layout = Layout::from_size_align(1 << shift, ALIGN).expect("valid layout");
            // SAFETY: non-zero size; zeroed so the contents are initialised.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            let ptr = match NonNull::new(ptr) {
                Some(p) => p,
                None if checked => {
                    return Err(AllocError::Map {
                        len,
                        err: std::io::Error::from_raw_os_error(libc::ENOMEM),
                    })
                }
                None => std::alloc::handle_alloc_error(layout),
            };
            return Ok(DmaBuf {
                ptr,
                len,
                origin: Origin::Heap(layout),
            });
        }
        // Large buffers (e.g. a malloc bdev's backing store): own mapping.
        let map_len = len_nz.next_multiple_of(HUGE_2M);
        let try_huge = POOL.get().is_some_and(|p| p.huge);
        // Prefault (as SPDK's zmalloc does by zeroing): a RAM disk must not
        // take page faults, nor read the kernel's zero page, on its I/O path.
        // A hugetlb mapping reserves its pages when mapped, so it fails
        // here, cleanly, when too few are free.
        let ptr = match try_huge
            .then(|| mmap_anon_flags(map_len, true, libc::MAP_POPULATE))
            .flatten()
        {
            Some(p) => p,
            None => {
                if checked {
                    check_available(map_len)?;
                }
                map_populated(map_len).map_err(|err| AllocError::Map { len, err })?
            }
        };
        Ok(DmaBuf {
            ptr,
            len,
            origin: Origin::Map(map_len),
        })
    }

    /// A zero-filled buffer.
    pub fn zeroed(len: usize) -> DmaBuf {
        DmaBuf::new(len).zero_pooled()
    }

    /// A zero-filled buffer, or an error naming the size when the machine
    /// cannot give it (see [`DmaBuf::try_new`]).
    pub fn try_zeroed(len: usize) -> Result<DmaBuf, AllocError> {
        DmaBuf::try_new(len).map(DmaBuf::zero_pooled)
    }

    /// Own mappings come zeroed from the kernel; pool and heap buffers may
    /// hold old data.
    fn zero_pooled(mut self) -> DmaBuf {
        if !matches!(self.origin, Origin::Map(_)) {
            self.as_mut_slice().fill(0);
        }
        self
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives unique access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Capacity actually backing this buffer (>= len).
    pub fn capacity(&self) -> usize {
        match self.origin {
            Origin::Pool(c) => 1 << (c as u32 + MIN_SHIFT),
            Origin::Heap(l) => l.size(),
            Origin::Map(l) => l,
        }
    }

    /// Shrink or grow the visible length within the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "DmaBuf::set_len beyond capacity");
        self.len = len;
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        match self.origin {
            Origin::Pool(class) => {
                let p = pool();
                p.free[class as usize].push(self.ptr.as_ptr() as usize - p.base);
            }
            // SAFETY: allocated with this exact layout in `new`.
            Origin::Heap(layout) => unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) },
            Origin::Map(len) => {
                // SAFETY: unmapping exactly the mapping created in `new`.
                unsafe {
                    libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, len);
                }
            }
        }
    }
}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuf").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_reuse_and_large() {
        let a = DmaBuf::new(512);
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        assert_eq!(a.capacity(), 4096);
        let addr = a.as_ptr() as usize;
        drop(a);
        let b = DmaBuf::new(4000);
        assert_eq!(b.as_ptr() as usize, addr, "freed buffer is reused");
        let mut big = DmaBuf::zeroed(5 << 20);
        assert!(big.as_slice().iter().all(|&x| x == 0));
        big.as_mut_slice()[5 << 19] = 7;
        assert_eq!(big.as_slice()[5 << 19], 7);
        let mut z = DmaBuf::zeroed(8192);
        z.as_mut_slice()[8191] = 1;
        assert_eq!(z.len(), 8192);
    }

    #[test]
    fn try_zeroed_refuses_what_the_machine_cannot_give() {
        let budget = crate::memory::available_memory().expect("Linux has /proc/meminfo");
        assert!(
            budget.bytes > 0 && budget.headroom >= 64 << 20,
            "{budget:?}"
        );
        let len = 1usize << 50; // 1 PiB
        let e = DmaBuf::try_zeroed(len).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, AllocError::TooLarge { .. }), "{msg}");
        assert!(
            msg.starts_with("could not allocate 1125899906842624 bytes (1024.0 TiB): at most "),
            "{msg}"
        );
        assert!(msg.contains(budget.limited_by), "{msg}");
        assert!(check_available(len).is_err() && check_available(4096).is_ok());
        // What fits still comes, zeroed, from the pool or its own mapping.
        for len in [512, 3 << 20] {
            let b = DmaBuf::try_zeroed(len).unwrap();
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
        }
    }
}
