//! Keeps the daemon's resident memory at what it uses, not at the worst burst it ever saw.
//!
//! glibc's allocator hands freed memory back to the kernel only from the top of a heap, and only
//! once the free top is larger than a threshold that it raises by itself: after a large block
//! (a results batch of a few MiB, say) was freed, blocks of that size stop going to `mmap` and
//! land in the thread's arena, where they leave holes. Each thread that allocates gets its own
//! arena (up to 8 per core), and tokio's blocking pool starts and ends threads all day. Live heap
//! stays at a few MiB, yet RSS creeps up by a megabyte every time a burst lands in a new place.
//! Measured under the chaos soak: live heap 2-5 MiB (heaptrack) while RSS grew 35% in minutes.
//!
//! Two measures, both glibc-only (other C libraries and allocators are left alone):
//! - [`tune`], at start: large blocks always go to `mmap` (a fixed threshold, which also stops
//!   glibc from raising it), so a burst is returned to the kernel when it is freed.
//! - [`trim`], on a timer: `malloc_trim(0)` gives back the free pages inside every arena, the
//!   holes included. It takes each arena's lock in turn, for well under a millisecond at the
//!   relay's heap size, so once a minute costs nothing measurable.

/// Blocks from this size up are mapped on their own and unmapped when freed (glibc's default
/// starting value, held fixed).
pub const MMAP_THRESHOLD: usize = 128 * 1024;
/// How long a free top of a heap may stay before glibc gives it back (its default, held fixed).
pub const TRIM_THRESHOLD: usize = 128 * 1024;

/// Most allocator arenas: one per core. glibc allows eight per core, and each thread of tokio's
/// blocking pool that writes to the store may take a new one, each keeping its own free space: a
/// 50,000-device monitoring cycle peaked at 145 MB with the default, 130 MB with two arenas.
pub fn arena_max() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
}

/// Sets the allocator's thresholds and arena count; call it at start, before threads allocate
/// (the values are process-wide).
#[allow(unsafe_code)]
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; any value is accepted or refused
        // with 0, and both thresholds are well inside c_int.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
            libc::mallopt(
                libc::M_ARENA_MAX,
                libc::c_int::try_from(arena_max()).unwrap_or(libc::c_int::MAX),
            );
        }
    }
}

/// Gives free allocator memory back to the kernel. True when some was released.
#[allow(unsafe_code)]
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim walks the allocator's own free lists under its own locks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The allocator's own account: bytes handed out and not yet freed, and free bytes it keeps inside
/// its arenas. RSS minus the first is what the process holds beyond its live data (free space the
/// allocator kept, holes, code and stacks): a leak raises the first, fragmentation only the RSS.
#[derive(Debug, Clone, Copy)]
pub struct Heap {
    pub in_use: u64,
    pub free: u64,
}

/// The allocator's account, where it gives one (glibc).
#[allow(unsafe_code)]
pub fn heap() -> Option<Heap> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters (under its locks) into a struct
        // it returns by value.
        let m = unsafe { libc::mallinfo2() };
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        Some(Heap {
            // Small blocks in the arenas, plus the large ones mapped on their own.
            in_use: n(m.uordblks).saturating_add(n(m.hblkhd)),
            free: n(m.fordblks),
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// The process's figures from `/proc/self`: resident and virtual bytes, threads, open files (when
/// `/proc/self/fd` can be listed).
#[derive(Debug, Clone, Copy, Default)]
pub struct Process {
    pub resident: u64,
    pub virtual_size: u64,
    pub threads: u64,
    pub open_fds: Option<u64>,
}

/// Reads [`Process`]; `None` where `/proc` is not mounted.
pub fn process() -> Option<Process> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let kib = |v: u64| v.saturating_mul(1024);
    // Not counting the descriptor that lists them.
    let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| {
        u64::try_from(d.count())
            .unwrap_or(u64::MAX)
            .saturating_sub(1)
    });
    Some(Process {
        resident: kib(field("VmRSS")?),
        virtual_size: kib(field("VmSize")?),
        threads: field("Threads")?,
        open_fds,
    })
}

/// Tests that measure the allocator's process-wide figures (here and in the store) take this
/// lock, so that no two of them run at once.
#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
pub(crate) static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    fn rss_anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("RssAnon in /proc/self/status")
    }

    #[test]
    fn the_allocator_counts_what_is_live() {
        let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
        let before = heap().expect("glibc gives its account").in_use;
        // 32 MiB in 8 KiB blocks, below the mmap threshold: counted in the arenas. Other tests
        // allocate and free meanwhile in this process, so only half of it must show.
        let blocks: Vec<Vec<u8>> = (0..4 * 1024).map(|_| vec![7u8; 8 * 1024]).collect();
        let during = heap().expect("glibc gives its account").in_use;
        assert!(
            during >= before.saturating_add(16 << 20),
            "in use went from {before} to {during} with 32 MiB live"
        );
        drop(blocks);
        let p = process().expect("/proc/self");
        assert!(
            p.resident > 1 << 20 && p.virtual_size >= p.resident,
            "{p:?}"
        );
        assert!(
            p.threads >= 1 && p.open_fds.is_some_and(|n| n >= 3),
            "{p:?}"
        );
    }

    #[test]
    fn trim_gives_back_the_holes_a_burst_left() {
        let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
        tune();
        // In a thread of its own (its own arena, as a blocking-pool thread would have): 24 MiB
        // of small blocks, all freed but the last, which pins the top of the heap so glibc
        // cannot give anything back by itself.
        let released_kib = std::thread::spawn(|| {
            let mut blocks: Vec<Box<[u8; 1024]>> =
                (0..24 * 1024).map(|_| Box::new([1u8; 1024])).collect();
            let last = blocks.pop();
            drop(blocks);
            let before = rss_anon_kib();
            assert!(trim(), "malloc_trim released nothing");
            let after = rss_anon_kib();
            drop(last);
            before.saturating_sub(after)
        })
        .join()
        .expect("the burst thread");
        // Other tests allocate meanwhile in this process; most of the 24 MiB must still show.
        assert!(
            released_kib >= 12 * 1024,
            "trim gave back only {released_kib} KiB of a 24 MiB hole"
        );
    }
}
