//! Files that must never be seen half-written: checkpoints, node state,
//! private keys. Written to a temporary file beside the target, flushed to
//! disk (fsync), renamed over the target, and the directory synced, so a
//! crash at any point leaves either the old file or the new one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::NetError;

pub fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> Result<(), NetError> {
    let io = |what: &str, e: std::io::Error| NetError::Io(format!("cannot {what} {}: {e}", path.display()));
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| NetError::Io(format!("{} is not a file name", path.display())))?;
    // A fresh name that must not exist: a file or link planted under a
    // predictable name cannot redirect the write.
    let suffix = crate::keys::random_hex(8)?;
    let tmp = dir.join(format!(".{}.tmp-{suffix}", name.to_string_lossy()));
    {
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(if private { 0o600 } else { 0o644 });
        }
        let mut f = opts.open(&tmp).map_err(|e| io("write", e))?;
        let written = f.write_all(bytes).and_then(|_| f.sync_all());
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io("write", e));
        }
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io("replace", e));
    }
    // The rename itself reaches the disk only with the directory.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("fedagg-files-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state.bin");
        write_atomic(&p, b"first", false).unwrap();
        write_atomic(&p, b"second", true).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        assert!(write_atomic(&dir.join("no/such/dir/x"), b"x", false).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
