//! What memory a new buffer may take: MemAvailable, the memory cgroup's
//! limit and the address-space limit, checked before a buffer whose size
//! came from outside (an RPC) is mapped, so that a size the machine cannot
//! give is an error rather than an abort or an OOM kill of the target.

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

#[cfg(test)]
mod tests {
    use super::*;

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
