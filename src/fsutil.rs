//! File-system helpers: atomic writes, so that a crash or Ctrl-C never leaves half a baseline,
//! report or LoRA behind.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, creating
/// the parent folders when needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).at(parent)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?
        .to_string_lossy();
    let tmp = parent.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        f.sync_all().at(&tmp)?;
        std::fs::rename(&tmp, path).at(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Atomic write of a UTF-8 string.
pub fn write_text_atomic(path: &Path, text: &str) -> Result<()> {
    write_atomic(path, text.as_bytes())
}

/// Reads a file to a string, naming the file on failure.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).at(path)
}

/// A short, stable hex digest (FNV-1a 64, twice with different seeds) for cache keys and file
/// identities. Not cryptographic: it names content, it does not protect it.
pub fn content_hash(bytes: &[u8]) -> String {
    fn fnv(bytes: &[u8], seed: u64) -> u64 {
        let mut h = 0xcbf29ce484222325u64 ^ seed;
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h
    }
    format!("{:016x}{:016x}", fnv(bytes, 0), fnv(bytes, 0x9e3779b97f4a7c15))
}

/// The content hash of a file.
pub fn file_hash(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).at(path)?;
    Ok(content_hash(&bytes))
}
