//! Reading and writing safetensors files without ever panicking on bad bytes.
//!
//! Every file a user hands us (a LoRA, a checkpoint) may be truncated, corrupt or something else
//! entirely, so the reader validates the header, the offsets and the dtypes before it builds a
//! tensor, and reports the first problem as [`Error::TensorFile`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;

use crate::error::{Error, IoContext, Result};

/// All tensors of one safetensors file, converted to `dtype` on `device`, with its metadata.
#[derive(Debug, Clone)]
pub struct TensorFile {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    /// The `__metadata__` map of the header (empty when the file has none).
    pub metadata: BTreeMap<String, String>,
    /// The dtype each tensor had on disk, by name (for `inspect` and for format detection).
    pub stored_dtypes: HashMap<String, safetensors::Dtype>,
}

impl TensorFile {
    /// Reads a whole safetensors file. Float tensors are converted to `dtype`; integer and bool
    /// tensors (position-id buffers in old checkpoints) are kept in their own dtype.
    pub fn load(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).at(path)?;
        // SAFETY: the map is read-only and dropped before this function returns, and loragate
        // never changes a file in place: its writes (`tensors::save`, `fsutil::write_atomic`)
        // rename a new file over the old path, so a map of the old file keeps its bytes. Another
        // process that changes the file in place while it is mapped is outside what this can
        // guard: rewritten bytes are read as they are (wrong numbers), and reading a page past
        // a truncated end raises SIGBUS, which kills the process (no error to report).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.at(path)?;
        Self::from_bytes(path, &mmap, dtype, device)
    }

    /// Parses safetensors bytes; `path` is only used in messages.
    pub fn from_bytes(path: &Path, bytes: &[u8], dtype: DType, device: &Device) -> Result<Self> {
        let bad = |reason: String| Error::TensorFile { path: path.to_path_buf(), reason };
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(describe(&e)))?;
        let metadata: BTreeMap<String, String> =
            header.metadata().clone().map(|m| m.into_iter().collect()).unwrap_or_default();
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(describe(&e)))?;
        let mut tensors = HashMap::new();
        let mut stored_dtypes = HashMap::new();
        for (name, view) in st.tensors() {
            let t = view_to_tensor(&view, dtype, device)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            stored_dtypes.insert(name.clone(), view.dtype());
            tensors.insert(name, t);
        }
        Ok(TensorFile { path: path.to_path_buf(), tensors, metadata, stored_dtypes })
    }

    /// Names in sorted order, for stable messages and listings.
    pub fn sorted_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall | E::HeaderTooLarge | E::InvalidHeaderLength => {
            format!("{e:?} (the file is truncated or is not a safetensors file)")
        }
        E::MetadataIncompleteBuffer => {
            "the file is shorter than its header says (truncated download?)".to_string()
        }
        other => format!("{other:?}"),
    }
}

fn view_to_tensor(view: &safetensors::tensor::TensorView<'_>, dtype: DType, device: &Device) -> Result<Tensor> {
    use safetensors::Dtype as S;
    let shape: Vec<usize> = view.shape().to_vec();
    let data = view.data();
    let numel: usize = shape.iter().product();
    let need = |size: usize| -> Result<()> {
        if numel.checked_mul(size) != Some(data.len()) {
            return Err(Error::invalid(format!(
                "{} bytes of data for shape {shape:?} of {:?}",
                data.len(),
                view.dtype()
            )));
        }
        Ok(())
    };
    // Copy through aligned vectors: mmap'd data has no alignment guarantee.
    let t = match view.dtype() {
        S::F32 => {
            need(4)?;
            let v: Vec<f32> = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?
        }
        S::F16 => {
            need(2)?;
            let v: Vec<f32> = data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
            Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?
        }
        S::BF16 => {
            need(2)?;
            let v: Vec<f32> = data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
            Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?
        }
        S::F64 => {
            need(8)?;
            let v: Vec<f64> = data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("chunks_exact(8)")))
                .collect();
            Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?
        }
        S::I64 => {
            need(8)?;
            let v: Vec<i64> = data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("chunks_exact(8)")))
                .collect();
            Tensor::from_vec(v, shape, device)?
        }
        S::I32 => {
            need(4)?;
            let v: Vec<i64> = data.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64).collect();
            Tensor::from_vec(v, shape, device)?
        }
        S::U8 | S::BOOL => {
            need(1)?;
            Tensor::from_vec(data.to_vec(), shape, device)?
        }
        other => return Err(Error::invalid(format!("unsupported dtype {other:?}"))),
    };
    Ok(t)
}

/// Storage dtype when writing tensors to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    F16,
}

/// Writes tensors (any float dtype in memory) as one safetensors file, atomically: the data goes
/// to a temporary file in the same folder that is renamed over the target only when complete.
pub fn save(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
    dtype: SaveDtype,
) -> Result<()> {
    let bytes = serialize(tensors, metadata, dtype).map_err(|e| match e {
        Error::Invalid(m) => Error::invalid(format!("serialising {}: {m}", path.display())),
        other => other,
    })?;
    crate::fsutil::write_atomic(path, &bytes)
}

/// The safetensors bytes of `tensors`.
pub fn serialize(
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
    dtype: SaveDtype,
) -> Result<Vec<u8>> {
    let mut raw: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        let shape = t.dims().to_vec();
        let flat = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let (dt, bytes) = match dtype {
            SaveDtype::F32 => (safetensors::Dtype::F32, flat.iter().flat_map(|v| v.to_le_bytes()).collect()),
            SaveDtype::F16 => (
                safetensors::Dtype::F16,
                flat.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
            ),
        };
        raw.push((name.clone(), dt, shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = raw
        .iter()
        .map(|(n, dt, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
                .map_err(|e| Error::invalid(format!("tensor `{n}`: {e:?}")))?;
            Ok((n.clone(), view))
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let meta = if meta.is_empty() { None } else { Some(meta) };
    safetensors::serialize(views, meta).map_err(|e| Error::invalid(format!("{e:?}")))
}

/// The dtype most of a safetensors file's tensors are stored in (f16, bf16, else f32), from its
/// header alone.
pub fn dominant_dtype(path: &Path) -> Result<DType> {
    use std::io::Read;
    let bad = |m: &str| Error::TensorFile { path: path.to_path_buf(), reason: m.to_string() };
    let mut f = std::fs::File::open(path).at(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| bad("shorter than a safetensors header"))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(bad("implausibly large header"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|_| bad("truncated header"))?;
    let v: serde_json::Value = serde_json::from_slice(&header).map_err(|_| bad("header is not JSON"))?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (k, info) in v.as_object().into_iter().flatten() {
        if k != "__metadata__" {
            *counts.entry(info["dtype"].as_str().unwrap_or("").to_string()).or_default() += 1;
        }
    }
    Ok(match counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d).as_deref() {
        Some("F16") => DType::F16,
        Some("BF16") => DType::BF16,
        _ => DType::F32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `TensorFile::load`'s map relies on: saving over a file that is mapped leaves the
    /// map's bytes alone (a new file is renamed over the path), where a write in place would
    /// change them under the reader or, by truncating, make reading them raise SIGBUS.
    #[test]
    fn saving_over_a_mapped_file_leaves_the_map_intact() {
        let dir = std::env::temp_dir().join(format!("loragate-tensors-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.safetensors");
        let one = |v: f32, n: usize| BTreeMap::from([("w".to_string(), Tensor::full(v, n, &Device::Cpu).unwrap())]);
        save(&path, &one(1.0, 4096), &BTreeMap::new(), SaveDtype::F32).unwrap();
        let before = std::fs::read(&path).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: this test is the file's only user, and the point is that `save` below does
        // not change the mapped file.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        // Shorter and different: an in-place write would truncate the mapped file.
        save(&path, &one(2.0, 16), &BTreeMap::new(), SaveDtype::F32).unwrap();
        assert_eq!(&map[..], &before[..], "the mapped bytes are the old file's");
        let reloaded = TensorFile::load(&path, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(reloaded.tensors["w"].to_vec1::<f32>().unwrap(), vec![2.0; 16]);
        drop(map);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
