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
    mlp: super::OnFirstUse<AestheticMlp>,
    /// The layer widths, input first (from the file's header).
    widths: Vec<usize>,
    device: Device,
    files: super::FilesFingerprint,
}

impl AestheticModel {
    /// Loads the predictor; the layer widths are read from the weights' shapes.
    pub fn load(file: &Path, device: &Device) -> Result<Self> {
        let model = Self::open(file, device)?;
        model.mlp.get()?;
        Ok(model)
    }

    /// Like [`AestheticModel::load`], but only the header is read now (the layout and the
    /// widths are checked); the weights on the first score.
    pub fn open(file: &Path, device: &Device) -> Result<Self> {
        if file.extension().is_none_or(|e| e != "safetensors") {
            return Err(Error::model(
                file,
                "the aesthetic predictor must be a .safetensors file; convert the published .pth once with \
                 `python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('x.pth'), 'x.safetensors')\"`",
            ));
        }
        let (shapes, _) = crate::model::formats::single_file::read_header(file)?;
        let mut widths = Vec::new();
        for (i, k) in AestheticMlp::KEYS.iter().enumerate() {
            let key = format!("layers.{k}.weight");
            let w = shapes.get(&key).ok_or_else(|| {
                Error::model(file, format!("no `{key}`: not the LAION aesthetic predictor's layout (layers.0, .2, .4, .6 and .7, as in the published .pth)"))
            })?;
            let &[out, inp] = w.as_slice() else { return Err(Error::model(file, format!("`{key}` is not a matrix"))) };
            if i == 0 {
                widths.push(inp);
            } else if widths[i] != inp {
                return Err(Error::model(file, format!("`{key}` reads {inp} values but the layer before gives {}", widths[i])));
            }
            widths.push(out);
        }
        let (f, dev, w) = (file.to_path_buf(), device.clone(), widths.clone());
        let mlp = super::OnFirstUse::deferred(move || {
            let tf = TensorFile::load(&f, DType::F32, &dev)?;
            let store = WeightStore::from_tensors(&f, tf.tensors, DType::F32, &dev);
            let targets = RefCell::new(Default::default());
            AestheticMlp::load(&Params::root(&store, &targets), &w).map_err(|e| match e {
                Error::Invalid(m) => Error::model(&f, m),
                other => other,
            })
        });
        Ok(AestheticModel { path: file.to_path_buf(), mlp, widths, device: device.clone(), files: super::FilesFingerprint::new(vec![file.to_path_buf()]) })
    }

    /// The width of the CLIP image embedding it reads.
    pub fn input_width(&self) -> usize {
        self.widths[0]
    }

    /// Whether its weights have been read (an unchanged re-run reads none).
    pub fn weights_loaded(&self) -> bool {
        self.mlp.is_loaded()
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
        Ok(self.mlp.get()?.forward(&x)?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    }
}
