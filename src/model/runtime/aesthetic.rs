//! The LAION aesthetic predictor loaded as a scorer: one safetensors file in the published
//! layout (`layers.{0,2,4,6,7}.weight/bias`), reading the L2-normalised CLIP image embeddings
//! of the CLIP model it was trained on (ViT-L/14 for the published weights: 768 wide).

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::arch::aesthetic::AestheticMlp;
use crate::model::params::{Params, WeightStore};
use crate::tensors::TensorFile;

pub struct AestheticModel {
    pub path: PathBuf,
    mlp: AestheticMlp,
    device: Device,
    files: super::FilesFingerprint,
}

impl AestheticModel {
    /// Loads the predictor; the layer widths are read from the weights' shapes.
    pub fn load(file: &Path, device: &Device) -> Result<Self> {
        if file.extension().is_none_or(|e| e != "safetensors") {
            return Err(Error::model(
                file,
                "the aesthetic predictor must be a .safetensors file; convert the published .pth once with \
                 `python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('x.pth'), 'x.safetensors')\"`",
            ));
        }
        let tf = TensorFile::load(file, DType::F32, device)?;
        let mut widths = Vec::new();
        for (i, k) in AestheticMlp::KEYS.iter().enumerate() {
            let key = format!("layers.{k}.weight");
            let w = tf.tensors.get(&key).ok_or_else(|| {
                Error::model(file, format!("no `{key}`: not the LAION aesthetic predictor's layout (layers.0, .2, .4, .6 and .7, as in the published .pth)"))
            })?;
            let (out, inp) = w.dims2().map_err(|_| Error::model(file, format!("`{key}` is not a matrix")))?;
            if i == 0 {
                widths.push(inp);
            } else if widths[i] != inp {
                return Err(Error::model(file, format!("`{key}` reads {inp} values but the layer before gives {}", widths[i])));
            }
            widths.push(out);
        }
        let store = WeightStore::from_tensors(file, tf.tensors, DType::F32, device);
        let targets = RefCell::new(Default::default());
        let mlp = AestheticMlp::load(&Params::root(&store, &targets), &widths).map_err(|e| match e {
            Error::Invalid(m) => Error::model(file, m),
            other => other,
        })?;
        Ok(AestheticModel { path: file.to_path_buf(), mlp, device: device.clone(), files: super::FilesFingerprint::new(vec![file.to_path_buf()]) })
    }

    /// The width of the CLIP image embedding it reads.
    pub fn input_width(&self) -> usize {
        self.mlp.input
    }

    pub fn fingerprint(&self) -> Result<String> {
        self.files.get()
    }

    /// Scores of normalised CLIP image embeddings, one per row.
    pub fn scores(&self, embeddings: &[Vec<f32>]) -> Result<Vec<f64>> {
        if embeddings.is_empty() {
            return Ok(Vec::new());
        }
        let width = self.input_width();
        if let Some(e) = embeddings.iter().find(|e| e.len() != width) {
            return Err(Error::invalid(format!(
                "the aesthetic predictor {} reads {width}-wide CLIP embeddings but the CLIP model gives {}: use the CLIP model it was trained on",
                self.path.display(),
                e.len()
            )));
        }
        let flat: Vec<f32> = embeddings.iter().flatten().copied().collect();
        let x = Tensor::from_vec(flat, (embeddings.len(), width), &Device::Cpu)?.to_device(&self.device)?;
        Ok(self.mlp.forward(&x)?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    }
}
