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

/// Files at least this large are remembered in the memo: smaller ones hash faster than the
/// memo reads.
const MEMO_MIN_SIZE: u64 = 16 << 20;

/// How long before its hashing a file must have last changed for its hash to be remembered.
/// Modification times have a resolution (2 s on FAT, 1 s on some network and older file
/// systems, a kernel tick on ext4): a file rewritten with the same size within one tick of
/// its previous change keeps the same size and mtime, so a memo entry taken in that window
/// could describe the old content. Any change after the file was examined gets an mtime of at
/// least that moment minus one tick, which is later than an mtime this much older; files
/// changed more recently are hashed again on every run until they are older (as git treats
/// "racily clean" index entries).
const MEMO_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(3);

/// Where [`file_hash_with`] found a hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashSource {
    /// Remembered in the memo under the file's path, size and modification time.
    Memo,
    /// Read from the file.
    Read,
}

/// The SHA-256 of a file's whole content, streamed. Memoised by path, size and mtime when
/// [`use_hash_memo`] was called; a memo that cannot be read or written is only a slower run.
pub fn file_hash(path: &Path) -> Result<String> {
    let memo_file = MEMO_FILE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(file_hash_with(path, memo_file.as_deref())?.0)
}

/// [`file_hash`] with the memo `memo_file` (none: always read), saying where the hash came
/// from. Only files of [`MEMO_MIN_SIZE`] or more whose last change is [`MEMO_MIN_AGE`] old
/// are remembered, and only when they did not change while they were read.
pub fn file_hash_with(path: &Path, memo_file: Option<&Path>) -> Result<(String, HashSource)> {
    use sha2::Digest;
    use std::io::Read;
    let now = std::time::SystemTime::now();
    let meta = std::fs::metadata(path).at(path)?;
    let modified = |m: &std::fs::Metadata| m.modified().ok();
    let stamp = |m: &std::fs::Metadata| modified(m).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
    let (size, modified_ns) = (meta.len(), stamp(&meta));
    let key = memo_key(path);
    let mut memo: BTreeMap<String, MemoEntry> = memo_file.and_then(|m| std::fs::read_to_string(m).ok()).and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    if let Some(e) = memo.get(&key)
        && e.size == size
        && e.modified_ns == modified_ns
        && modified_ns != 0
    {
        return Ok((e.sha256.clone(), HashSource::Memo));
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
    let settled = modified(&meta).and_then(|t| now.duration_since(t).ok()).is_some_and(|age| age >= MEMO_MIN_AGE);
    let unchanged = || std::fs::metadata(path).is_ok_and(|after| after.len() == size && stamp(&after) == modified_ns);
    if let Some(m) = memo_file
        && size >= MEMO_MIN_SIZE
        && modified_ns != 0
        && settled
        && unchanged()
    {
        memo.insert(key, MemoEntry { size, modified_ns, sha256: sha256.clone() });
        let _ = write_text_atomic(m, &serde_json::to_string(&memo).expect("serialisable"));
    }
    Ok((sha256, HashSource::Read))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hash_is_sha256() {
        assert_eq!(content_hash(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    /// Sets `f`'s modification time `ago` before now.
    fn age(f: &Path, ago: std::time::Duration) -> std::time::SystemTime {
        let t = std::time::SystemTime::now() - ago;
        std::fs::File::options().write(true).open(f).unwrap().set_modified(t).unwrap();
        t
    }

    #[test]
    fn file_hashes_cover_the_whole_file_and_come_from_the_memo_only_when_unchanged() {
        let dir = std::env::temp_dir().join(format!("loragate-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (f, memo) = (dir.join("big.bin"), dir.join("memo.json"));
        let memo = Some(memo.as_path());
        // 17 MiB, last changed a minute ago: read once, then remembered.
        let mut bytes = vec![7u8; 17 << 20];
        std::fs::write(&f, &bytes).unwrap();
        age(&f, std::time::Duration::from_secs(60));
        let (h1, source) = file_hash_with(&f, memo).unwrap();
        assert_eq!((h1.as_str(), source), (content_hash(&bytes).as_str(), HashSource::Read));
        assert!(dir.join("memo.json").is_file());
        assert_eq!(file_hash_with(&f, memo).unwrap(), (h1.clone(), HashSource::Memo));
        // The memo answers by path, size and mtime alone: an entry is trusted, not re-read.
        let text = std::fs::read_to_string(dir.join("memo.json")).unwrap();
        std::fs::write(dir.join("memo.json"), text.replace(&h1, &"0".repeat(64))).unwrap();
        assert_eq!(file_hash_with(&f, memo).unwrap().0, "0".repeat(64));
        // A change in the middle (same size, new mtime) is read again.
        bytes[9 << 20] = 8;
        std::fs::write(&f, &bytes).unwrap();
        let (h2, source) = file_hash_with(&f, memo).unwrap();
        assert_eq!((h2.as_str(), source), (content_hash(&bytes).as_str(), HashSource::Read));
        assert_ne!(h1, h2, "a byte in the middle of a large file changes its hash");
        // Small files are always read.
        std::fs::write(dir.join("small.bin"), b"abc").unwrap();
        age(&dir.join("small.bin"), std::time::Duration::from_secs(60));
        for _ in 0..2 {
            assert_eq!(file_hash_with(&dir.join("small.bin"), memo).unwrap().1, HashSource::Read);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A same-size rewrite within the file system's timestamp resolution keeps size and mtime:
    /// a file hashed that soon after a change is not remembered, so the rewrite is read.
    #[test]
    fn a_same_size_rewrite_within_the_timestamp_resolution_is_hashed_again() {
        let dir = std::env::temp_dir().join(format!("loragate-hash-racy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (f, memo) = (dir.join("big.bin"), dir.join("memo.json"));
        let memo = Some(memo.as_path());
        let mut bytes = vec![1u8; 17 << 20];
        std::fs::write(&f, &bytes).unwrap();
        // As a file system with one-second timestamps would record a change this second.
        let stamp = age(&f, std::time::Duration::from_millis(500));
        assert_eq!(file_hash_with(&f, memo).unwrap(), (content_hash(&bytes), HashSource::Read));
        bytes[3] = 2;
        std::fs::write(&f, &bytes).unwrap();
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(stamp).unwrap();
        assert_eq!(file_hash_with(&f, memo).unwrap(), (content_hash(&bytes), HashSource::Read), "the rewrite's content, not a remembered hash");
        // Once the change is old enough, the hash is remembered.
        age(&f, MEMO_MIN_AGE * 2);
        assert_eq!(file_hash_with(&f, memo).unwrap().1, HashSource::Read);
        assert_eq!(file_hash_with(&f, memo).unwrap(), (content_hash(&bytes), HashSource::Memo));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
