//! File-system helpers: atomic writes, so that a crash or Ctrl-C never leaves half a baseline,
//! report or LoRA behind.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// The SHA-256 of `bytes`, in hex: names content in cache keys and file identities.
pub fn content_hash(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where hashes of large files are remembered between runs (see [`file_hash`]).
static MEMO_FILE: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Remembers file hashes in `path` (a JSON file), keyed by path, size and modification time,
/// so that an unchanged multi-gigabyte checkpoint is hashed once, not on every run.
pub fn use_hash_memo(path: PathBuf) {
    *MEMO_FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
}

#[derive(serde::Serialize, serde::Deserialize, Clone, PartialEq)]
struct MemoEntry {
    size: u64,
    modified_ns: u128,
    sha256: String,
}

fn memo_key(path: &Path) -> String {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).to_string_lossy().into_owned()
}

/// The SHA-256 of a file's whole content, streamed. Memoised by path, size and mtime when
/// [`use_hash_memo`] was called; a memo that cannot be read or written is only a slower run.
pub fn file_hash(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let meta = std::fs::metadata(path).at(path)?;
    let stamp = |m: &std::fs::Metadata| m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
    let (size, modified_ns) = (meta.len(), stamp(&meta));
    let memo_file = MEMO_FILE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let key = memo_key(path);
    let mut memo: BTreeMap<String, MemoEntry> =
        memo_file.as_ref().and_then(|m| std::fs::read_to_string(m).ok()).and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    if let Some(e) = memo.get(&key)
        && e.size == size
        && e.modified_ns == modified_ns
        && modified_ns != 0
    {
        return Ok(e.sha256.clone());
    }
    let mut file = std::fs::File::open(path).at(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let sha256 = hex(&hasher.finalize());
    // Only files worth remembering: small files hash faster than the memo reads.
    if let Some(m) = memo_file
        && size >= 16 << 20
    {
        memo.insert(key, MemoEntry { size, modified_ns, sha256: sha256.clone() });
        let _ = write_text_atomic(&m, &serde_json::to_string(&memo).expect("serialisable"));
    }
    Ok(sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hash_is_sha256() {
        assert_eq!(content_hash(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn file_hashes_cover_the_whole_file_and_follow_changes() {
        let dir = std::env::temp_dir().join(format!("loragate-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("big.bin");
        // 17 MiB: remembered in the memo; a change in the middle must change the hash.
        let mut bytes = vec![7u8; 17 << 20];
        std::fs::write(&f, &bytes).unwrap();
        use_hash_memo(dir.join("memo.json"));
        let h1 = file_hash(&f).unwrap();
        assert_eq!(h1, content_hash(&bytes));
        assert!(dir.join("memo.json").is_file());
        assert_eq!(file_hash(&f).unwrap(), h1, "from the memo");
        bytes[9 << 20] = 8;
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, &bytes).unwrap();
        let h2 = file_hash(&f).unwrap();
        assert_ne!(h1, h2, "a byte in the middle of a large file changes its hash");
        assert_eq!(h2, content_hash(&bytes));
        *MEMO_FILE.lock().unwrap() = None;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
