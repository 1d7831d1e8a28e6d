//! Fallible allocation of buffers whose size comes from user input.
//!
//! `vec![0.0; n]` aborts the whole process, R included, when the allocator
//! fails. Worse, with Linux overcommit a request far beyond the free memory
//! usually succeeds and the OOM killer ends R later, when the pages are
//! touched. So buffers sized by the user are checked first: the byte count
//! with checked arithmetic, then against the memory the system reports as
//! available (and the process's own limits, `ulimit -v` and `ulimit -d`),
//! and only then reserved with `try_reserve_exact`.

use crate::error::{CoreError, CoreResult};
use std::mem::size_of;

/// Requests below this skip the look-up of available memory: reading /proc
/// costs more than such an allocation, and one request this small cannot by
/// itself exhaust a machine that runs R.
const CHECK_AVAILABLE_FROM: usize = 64 << 20;

/// Bytes taken by `len` values of `T`, or a `Memory` error when that does not
/// fit in the address space.
pub fn byte_size<T>(len: usize, what: &str) -> CoreResult<usize> {
    len.checked_mul(size_of::<T>())
        .filter(|&bytes| bytes <= isize::MAX as usize)
        .ok_or_else(|| {
            CoreError::Memory(format!(
                "cannot allocate {what}: {len} values of {} bytes exceed the address space",
                size_of::<T>()
            ))
        })
}

/// Errors when `bytes` exceeds the memory known to be available, so that a
/// request doomed under overcommit fails now, with a message, instead of
/// bringing in the OOM killer later.
pub fn check_bytes(bytes: usize, what: &str) -> CoreResult<()> {
    if bytes < CHECK_AVAILABLE_FROM {
        return Ok(());
    }
    match available_bytes() {
        Some(available) if bytes > available => Err(not_enough(what, bytes, Some(available))),
        _ => Ok(()),
    }
}

/// `byte_size` then `check_bytes`: for buffers allocated elsewhere (R vectors).
pub fn check_request<T>(len: usize, what: &str) -> CoreResult<()> {
    check_bytes(byte_size::<T>(len, what)?, what)
}

/// An empty vector with room for exactly `len` values.
pub fn try_with_capacity<T>(len: usize, what: &str) -> CoreResult<Vec<T>> {
    let bytes = byte_size::<T>(len, what)?;
    check_bytes(bytes, what)?;
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| not_enough(what, bytes, available_bytes()))?;
    Ok(v)
}

/// `len` copies of `value`.
pub fn try_filled<T: Clone>(len: usize, value: T, what: &str) -> CoreResult<Vec<T>> {
    let mut v = try_with_capacity(len, what)?;
    v.resize(len, value);
    Ok(v)
}

/// `len` zeros.
pub fn try_zeroed(len: usize, what: &str) -> CoreResult<Vec<f64>> {
    try_filled(len, 0.0, what)
}

/// A copy of `x`.
pub fn try_copy<T: Copy>(x: &[T], what: &str) -> CoreResult<Vec<T>> {
    let mut v = try_with_capacity(x.len(), what)?;
    v.extend_from_slice(x);
    Ok(v)
}

fn not_enough(what: &str, bytes: usize, available: Option<usize>) -> CoreError {
    CoreError::Memory(match available {
        Some(a) => format!(
            "not enough memory for {what}: it needs {} but only {} are available",
            describe_bytes(bytes),
            describe_bytes(a)
        ),
        None => format!("not enough memory for {what}: allocating {} failed", describe_bytes(bytes)),
    })
}

/// "1.5 GiB (1610612736 bytes)": readable, with the exact count for checking.
pub fn describe_bytes(bytes: usize) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {} ({bytes} bytes)", UNITS[unit])
    }
}

/// Memory a new allocation can use without swapping or being killed, when the
/// system says: the least of MemAvailable, the memory limit of the process's
/// cgroup (containers) and the room left under the process's own limits.
pub fn available_bytes() -> Option<usize> {
    [mem_available(), cgroup_limit(), process_limit()].into_iter().flatten().min()
}

/// Room left under the process's own limits, given the text of
/// /proc/self/limits and /proc/self/status: the address-space limit
/// (RLIMIT_AS, `ulimit -v`) minus the virtual size (VmSize), and the data
/// limit (RLIMIT_DATA, `ulimit -d`, which counts private writable mappings
/// such as malloc's) minus the data size (VmData). The soft limits are the
/// ones enforced; `None` when neither is set.
pub fn process_headroom(limits: &str, status: &str) -> Option<usize> {
    [("Max address space", "VmSize"), ("Max data size", "VmData")]
        .into_iter()
        .filter_map(|(limit, usage)| {
            let limit = soft_limit(limits, limit)?;
            // An unknown usage leaves the whole limit as the bound.
            Some(limit.saturating_sub(status_bytes(status, usage).unwrap_or(0)))
        })
        .min()
}

/// The soft limit in bytes of the line `name` of /proc/self/limits ("Max
/// address space   4096000000   unlimited   bytes"); `None` when unlimited
/// or absent.
pub fn soft_limit(limits: &str, name: &str) -> Option<usize> {
    let rest = limits.lines().find_map(|line| line.strip_prefix(name))?;
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let mut fields = rest.split_whitespace();
    let soft = fields.next()?.parse::<u64>().ok()?;
    // Only byte-counted limits ("unlimited" failed to parse above).
    if fields.nth(1) != Some("bytes") {
        return None;
    }
    usize::try_from(soft).ok()
}

/// The size in bytes of the field `name` of /proc/self/status ("VmSize:
/// 130544 kB").
pub fn status_bytes(status: &str, name: &str) -> Option<usize> {
    let rest = status.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))?;
    let mut fields = rest.split_whitespace();
    let value = fields.next()?.parse::<usize>().ok()?;
    match fields.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

#[cfg(target_os = "linux")]
fn process_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    process_headroom(&limits, &status)
}

#[cfg(not(target_os = "linux"))]
fn process_limit() -> Option<usize> {
    None
}

#[cfg(target_os = "linux")]
fn mem_available() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(not(target_os = "linux"))]
fn mem_available() -> Option<usize> {
    None
}

/// The cgroup's whole limit, not the limit minus current usage: usage counts
/// page cache the kernel would reclaim, and refusing memory that could be had
/// is worse than letting the allocator decide.
#[cfg(target_os = "linux")]
fn cgroup_limit() -> Option<usize> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut candidates = Vec::new();
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (id, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        if id == "0" && controllers.is_empty() {
            candidates.push(format!("/sys/fs/cgroup{path}/memory.max"));
            candidates.push("/sys/fs/cgroup/memory.max".to_string());
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"));
            candidates.push("/sys/fs/cgroup/memory/memory.limit_in_bytes".to_string());
        }
    }
    // Unlimited is "max" (v2) or a number near 2^63 (v1).
    candidates
        .iter()
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .filter_map(|text| text.trim().parse::<u64>().ok())
        .filter(|&limit| limit < 1 << 62)
        .filter_map(|limit| usize::try_from(limit).ok())
        .min()
}

#[cfg(not(target_os = "linux"))]
fn cgroup_limit() -> Option<usize> {
    None
}

/// `update` made owned (copied once when borrowed), to be changed in place.
pub(crate) fn make_owned<'u>(update: &'u mut std::borrow::Cow<'_, [f64]>, what: &str) -> CoreResult<&'u mut Vec<f64>> {
    if let std::borrow::Cow::Borrowed(x) = update {
        *update = std::borrow::Cow::Owned(try_copy(x, what)?);
    }
    Ok(update.to_mut())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_requests_succeed_and_are_filled() {
        assert_eq!(try_zeroed(5, "x").unwrap(), vec![0.0; 5]);
        assert_eq!(try_copy(&[1.0, 2.0], "x").unwrap(), vec![1.0, 2.0]);
        assert_eq!(try_filled(3, 7usize, "x").unwrap(), vec![7, 7, 7]);
        assert!(try_zeroed(0, "x").unwrap().is_empty());
    }

    #[test]
    fn byte_count_overflow_is_a_memory_error() {
        let err = try_zeroed(usize::MAX / 4, "the test buffer").unwrap_err();
        assert!(matches!(&err, CoreError::Memory(m) if m.contains("the test buffer") && m.contains("address space")), "{err}");
        assert!(byte_size::<f64>(usize::MAX / 8 + 1, "x").is_err());
        assert_eq!(byte_size::<f64>(3, "x").unwrap(), 24);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_request_beyond_available_memory_is_refused_with_sizes() {
        // 2^52 doubles = 32 PiB: more than any machine has, within the address space.
        let err = try_zeroed(1 << 52, "the huge buffer").unwrap_err();
        let CoreError::Memory(msg) = &err else { panic!("{err:?}") };
        assert!(msg.contains("the huge buffer") && msg.contains("36028797018963968 bytes"), "{msg}");
        if available_bytes().is_some() {
            assert!(msg.contains("available"), "{msg}");
        }
    }

    const LIMITS: &str = "\
Limit                     Soft Limit           Hard Limit           Units     
Max cpu time              unlimited            unlimited            seconds   
Max file size             unlimited            unlimited            bytes     
Max data size             DATA                 unlimited            bytes     
Max stack size            8388608              unlimited            bytes     
Max resident set          unlimited            unlimited            bytes     
Max processes             96367                96367                processes 
Max locked memory         8388608              8388608              bytes     
Max address space         AS                   8192000000           bytes     
Max msgqueue size         819200               819200               bytes     
";

    const STATUS: &str = "Name:\tR\nUmask:\t0022\nState:\tR (running)\nVmPeak:\t  140000 kB\n\
VmSize:\t  130544 kB\nVmLck:\t       0 kB\nVmRSS:\t   80000 kB\nVmData:\t   67492 kB\nVmStk:\t     132 kB\n\
VmExe:\t       4 kB\nThreads:\t3\n";

    fn limits(data: &str, address_space: &str) -> String {
        LIMITS.replace("DATA", data).replace("AS      ", address_space)
    }

    #[test]
    fn parses_process_limits_and_sizes() {
        let text = limits("unlimited", "4096000000");
        assert_eq!(soft_limit(&text, "Max address space"), Some(4_096_000_000));
        assert_eq!(soft_limit(&text, "Max stack size"), Some(8_388_608));
        assert_eq!(soft_limit(&text, "Max data size"), None, "unlimited");
        assert_eq!(soft_limit(&text, "Max processes"), None, "not bytes");
        assert_eq!(soft_limit(&text, "Max nice priority"), None, "absent");
        assert_eq!(soft_limit(&text, "Max address"), None, "a prefix of a name");
        assert_eq!(status_bytes(STATUS, "VmSize"), Some(130_544 * 1024));
        assert_eq!(status_bytes(STATUS, "VmData"), Some(67_492 * 1024));
        assert_eq!(status_bytes(STATUS, "Threads"), None, "not a size");
        assert_eq!(status_bytes(STATUS, "VmSwap"), None, "absent");
        assert_eq!(status_bytes("VmSizeX:\t12 kB\n", "VmSize"), None);
    }

    #[test]
    fn process_headroom_is_the_least_room_under_either_limit() {
        // ulimit -v 4000000 (KiB): the limit minus the virtual size.
        let text = limits("unlimited", "4096000000");
        assert_eq!(process_headroom(&text, STATUS), Some(4_096_000_000 - 130_544 * 1024));
        // ulimit -d: the data limit minus the data size, when that is less.
        let text = limits("1000000000", "4096000000");
        assert_eq!(process_headroom(&text, STATUS), Some(1_000_000_000 - 67_492 * 1024));
        let text = limits("1000000000", "unlimited");
        assert_eq!(process_headroom(&text, STATUS), Some(1_000_000_000 - 67_492 * 1024));
        // Already beyond the limit: no room at all.
        let text = limits("unlimited", "100000000");
        assert_eq!(process_headroom(&text, STATUS), Some(0));
        // Without the sizes, the whole limit.
        assert_eq!(process_headroom(&text, ""), Some(100_000_000));
        // No limits.
        assert_eq!(process_headroom(&limits("unlimited", "unlimited"), STATUS), None);
        assert_eq!(process_headroom("", STATUS), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn available_memory_respects_this_process_limits() {
        if let Some(room) = process_limit() {
            assert!(available_bytes().unwrap() <= room);
        }
        assert_eq!(
            available_bytes(),
            [mem_available(), cgroup_limit(), process_limit()].into_iter().flatten().min()
        );
    }

    #[test]
    fn describes_sizes_readably() {
        assert_eq!(describe_bytes(12), "12 bytes");
        assert_eq!(describe_bytes(3 << 30), "3.0 GiB (3221225472 bytes)");
    }
}
