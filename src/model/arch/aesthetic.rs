//! The LAION aesthetic predictor (improved-aesthetic-predictor) as an architecture.

use candle_core::{D, Tensor};

use crate::error::{Error, Result};
use crate::model::nn::Linear;
use crate::model::params::Params;

/// The LAION aesthetic predictor (improved-aesthetic-predictor): five linear layers, no
/// activations between them (dropout only in training), reading an L2-normalised CLIP image
/// embedding (ViT-L/14: 768 wide) and giving a score around 1–10. Keys `layers.{0,2,4,6,7}`.
pub struct AestheticMlp {
    layers: Vec<Linear>,
    pub input: usize,
}

impl AestheticMlp {
    pub const KEYS: [usize; 5] = [0, 2, 4, 6, 7];

    /// `widths` are the layers' input widths and the final 1 (the published: 768, 1024, 128,
    /// 64, 16, 1).
    pub fn load(p: &Params, widths: &[usize]) -> Result<Self> {
        if widths.len() != 6 || widths[5] != 1 {
            return Err(Error::invalid("the aesthetic predictor has five linear layers ending in one score"));
        }
        let layers = Self::KEYS.iter().enumerate().map(|(i, k)| Linear::load(&p.pp("layers").pp(*k), widths[i], widths[i + 1], true)).collect::<Result<Vec<_>>>()?;
        Ok(AestheticMlp { layers, input: widths[0] })
    }

    /// Normalised embeddings `[B, input]` → scores `[B]`.
    pub fn forward(&self, embeddings: &Tensor) -> Result<Tensor> {
        let mut x = embeddings.clone();
        for l in &self.layers {
            x = l.forward(&x)?;
        }
        Ok(x.squeeze(D::Minus1)?)
    }
}
