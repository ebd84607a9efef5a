//! Durable file writes: write a temp file beside the target, fsync, rename, fsync the directory. A crash at
//! any point leaves either the old file or the new one, never a torn one.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Atomically replace `path` with `bytes`.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::bad_file(dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::bad_file(&tmp, e))?;
        let written = f.write_all(bytes).and_then(|()| f.sync_all());
        if let Err(e) = written {
            // A full disk must not also leave the partial temp file behind, holding the space.
            drop(f);
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::bad_file(path, e));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::bad_file(path, e));
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The temp-file name `atomic_write` uses for `name`: `.NAME.PID.tmp`.
fn is_temp_name(file: &str) -> bool {
    let Some(inner) = file.strip_prefix('.').and_then(|f| f.strip_suffix(".tmp")) else { return false };
    match inner.rsplit_once('.') {
        Some((name, pid)) => !name.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

/// Remove the temp files a failed or killed `atomic_write` left under `dir` (recursively); returns how many
/// and their bytes. Only call it while no writer can be using `dir` (the session lock is held).
pub fn remove_stale_temps(dir: &Path) -> Result<(usize, u64)> {
    let mut found = (0usize, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::bad_file(&d, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::bad_file(&d, e))?;
            let kind = entry.file_type().map_err(|e| Error::bad_file(entry.path(), e))?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() && is_temp_name(&entry.file_name().to_string_lossy()) {
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(entry.path()).map_err(|e| Error::bad_file(entry.path(), e))?;
                found = (found.0 + 1, found.1 + len);
            }
        }
    }
    Ok(found)
}

/// Atomically write pretty JSON.
pub fn atomic_write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let s = serde_json::to_vec_pretty(value).map_err(|e| Error::bad_file(path, e))?;
    atomic_write(path, &s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp() -> Result<()> {
        let d = tempfile::tempdir()?;
        let p = d.path().join("a.txt");
        atomic_write(&p, b"one")?;
        atomic_write(&p, b"two")?;
        assert_eq!(std::fs::read_to_string(&p)?, "two");
        let n = std::fs::read_dir(d.path())?.count();
        assert_eq!(n, 1);
        Ok(())
    }

    #[test]
    fn stale_temps_are_removed_and_nothing_else() -> Result<()> {
        let d = tempfile::tempdir()?;
        let sub = d.path().join("round-01/heal");
        std::fs::create_dir_all(&sub)?;
        std::fs::write(d.path().join(".events.jsonl.4242.tmp"), b"12345")?;
        std::fs::write(sub.join(".checkpoint.safetensors.7.tmp"), b"123")?;
        for keep in [".hidden", "a.tmp", ".x.tmp", ".x.12a.tmp", "notes.txt"] {
            std::fs::write(d.path().join(keep), b"k")?;
        }
        assert_eq!(remove_stale_temps(d.path())?, (2, 8));
        assert_eq!(std::fs::read_dir(d.path())?.count(), 6, "five kept files and the round folder");
        assert_eq!(std::fs::read_dir(&sub)?.count(), 0);
        Ok(())
    }
}
