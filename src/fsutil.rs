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
        f.write_all(bytes).map_err(|e| Error::bad_file(&tmp, e))?;
        f.sync_all().map_err(|e| Error::bad_file(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::bad_file(path, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
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
}
