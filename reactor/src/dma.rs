//! DMA-able buffers: 4 KiB-aligned, from a hugepage-backed pool when
//! hugepages can be had (`MAP_HUGETLB`), otherwise from ordinary pages with
//! a logged warning. Freed buffers go back to lock-free per-size free lists,
//! so steady-state I/O allocates nothing from the system.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crossbeam_queue::SegQueue;

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

/// A buffer could not be had.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error(
        "could not allocate {len} bytes ({}): at most {} can be had ({} less {} kept free)",
        human(*len as u64),
        human(budget.bytes),
        budget.limited_by,
        human(budget.headroom)
    )]
    TooLarge { len: usize, budget: MemoryBudget },
    #[error("could not allocate {len} bytes ({}): {err}", human(*len as u64))]
    Map { len: usize, err: std::io::Error },
}

/// What a new buffer may take without driving the machine (or the
/// target's memory cgroup) into reclaim and the OOM killer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Bytes one new buffer may take.
    pub bytes: u64,
    /// The limit that set `bytes`.
    pub limited_by: &'static str,
    /// Bytes kept out of `bytes` for the kernel, the target's own buffers
    /// and the other processes.
    pub headroom: u64,
}

/// Whether `bytes` can be had now; the error names the size and the limit.
pub fn check_available(bytes: usize) -> Result<(), AllocError> {
    match available_memory() {
        Some(budget) if bytes as u64 > budget.bytes => {
            Err(AllocError::TooLarge { len: bytes, budget })
        }
        _ => Ok(()),
    }
}

/// The tightest of: MemAvailable (/proc/meminfo), the memory cgroup's
/// limit less its working set, and the address-space limit (`ulimit -v`)
/// less what is mapped; each less a headroom of 1/32 of its total (64 MiB
/// to 1 GiB). `None` when none of them can be read.
///
/// Why a check before mapping rather than trusting mmap: with the default
/// overcommit (`vm.overcommit_memory` 0) mmap refuses only a single mapping
/// larger than RAM + swap, and with 1 it refuses nothing; the pages are then
/// faulted in (or later written), the page allocator runs out and the OOM
/// killer takes the largest process: the target, with every user's clones.
/// MADV_POPULATE_WRITE reports ENOMEM only after the OOM killer has run.
/// MemAvailable is the kernel's own estimate of what can be had without
/// swapping; the cgroup figure is what containers are held to (their
/// /proc/meminfo shows the host's memory).
pub fn available_memory() -> Option<MemoryBudget> {
    let mut best: Option<MemoryBudget> = None;
    let mut offer = |free: u64, total: u64, limited_by: &'static str| {
        let headroom = (total / 32).clamp(64 << 20, 1 << 30);
        let bytes = free.saturating_sub(headroom);
        if best.is_none_or(|b| bytes < b.bytes) {
            best = Some(MemoryBudget {
                bytes,
                limited_by,
                headroom,
            });
        }
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let (Some(avail), Some(total)) = (
        kb_field(&meminfo, "MemAvailable:"),
        kb_field(&meminfo, "MemTotal:"),
    ) {
        offer(avail, total, "MemAvailable in /proc/meminfo");
    }
    if let Some((free, limit)) = cgroup_free() {
        offer(free, limit, "the memory cgroup's limit");
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } == 0
        && lim.rlim_cur != libc::RLIM_INFINITY
    {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if let Some(mapped) = kb_field(&status, "VmSize:") {
            let limit = lim.rlim_cur;
            offer(
                limit.saturating_sub(mapped),
                limit,
                "the address-space limit, ulimit -v,",
            );
        }
    }
    best
}

/// `key  N kB` from /proc/meminfo or /proc/self/status, in bytes.
fn kb_field(text: &str, key: &str) -> Option<u64> {
    let rest = text.lines().find_map(|l| l.strip_prefix(key))?;
    let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// (free bytes, limit) of the tightest memory cgroup this process is in,
/// counting its ancestors (cgroup v2, or v1's memory controller). The
/// working set leaves out inactive page cache, which the kernel reclaims
/// before it OOM-kills.
fn cgroup_free() -> Option<(u64, u64)> {
    let me = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut best: Option<(u64, u64)> = None;
    for line in me.lines() {
        let mut f = line.splitn(3, ':');
        let (id, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let v2 = id == "0" && ctrls.is_empty();
        if !v2 && !ctrls.split(',').any(|c| c == "memory") {
            continue;
        }
        let (root, max, cur, inactive) = if v2 {
            let root = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
                "/sys/fs/cgroup"
            } else {
                "/sys/fs/cgroup/unified"
            };
            (root, "memory.max", "memory.current", "inactive_file ")
        } else {
            (
                "/sys/fs/cgroup/memory",
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file ",
            )
        };
        let mut dir = std::path::PathBuf::from(format!("{root}{path}"));
        loop {
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
            // "max" (v2) or a huge number (v1) means no limit here.
            if let Some(limit) = read(max).and_then(|t| t.trim().parse::<u64>().ok()) {
                if limit < 1 << 60 {
                    let used = read(cur)
                        .and_then(|t| t.trim().parse::<u64>().ok())
                        .unwrap_or(0);
                    let reclaimable = read("memory.stat")
                        .and_then(|t| {
                            t.lines()
                                .find_map(|l| l.strip_prefix(inactive)?.trim().parse::<u64>().ok())
                        })
                        .unwrap_or(0);
                    let free = limit.saturating_sub(used.saturating_sub(reclaimable));
                    if best.is_none_or(|(b, _)| free < b) {
                        best = Some((free, limit));
                    }
                }
            }
            if dir.as_os_str().len() <= root.len() || !dir.pop() {
                break;
            }
        }
    }
    best
}

/// `1.5 GiB`-style size for messages.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
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
    /// against [`available_memory`] before anything is mapped.
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
        let budget = available_memory().expect("Linux has /proc/meminfo");
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

    #[test]
    fn proc_fields_and_sizes() {
        let text = "MemTotal:       24678100 kB\nMemAvailable:    2048 kB\n";
        assert_eq!(kb_field(text, "MemAvailable:"), Some(2 << 20));
        assert_eq!(kb_field(text, "MemTotal:"), Some(24678100 * 1024));
        assert_eq!(kb_field(text, "VmSize:"), None);
        assert_eq!(kb_field("MemTotal: x kB", "MemTotal:"), None);
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(human(1 << 40), "1.0 TiB");
    }
}
