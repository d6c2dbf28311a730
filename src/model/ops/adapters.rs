//! The layers a LoRA can patch, and how patches are applied.
//!
//! Every `Linear` and `Conv2d` a model builds is registered here under its state-dict path
//! (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`). A layer keeps its base weight
//! untouched and an *effective* weight that is the base plus the weighted sum of all adapter
//! deltas merged into it, so changing a LoRA's weight recomputes a few small matrix products and
//! never reloads the model. A delta is whatever a [`Patch`] computes from the base weight: a
//! low-rank product here, the LyCORIS algorithms and DoRA in `crate::lora`. Each delta is
//! computed against the base weight alone (not against the other merged deltas), so a stack's
//! result does not depend on its order. Layers with a bias keep it here too, for the full
//! bias differences LyCORIS writes. For training, a layer can also carry *live* adapters: trainable down/up
//! matrices that run in the forward pass unmerged, so gradients reach them.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

/// What kind of layer a path names, with the dimensions a LoRA must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Linear { in_features: usize, out_features: usize },
    Conv2d { in_channels: usize, out_channels: usize, kernel: usize },
}

impl LayerKind {
    pub fn in_dim(&self) -> usize {
        match *self {
            LayerKind::Linear { in_features, .. } => in_features,
            LayerKind::Conv2d { in_channels, kernel, .. } => in_channels * kernel * kernel,
        }
    }
    pub fn out_dim(&self) -> usize {
        match *self {
            LayerKind::Linear { out_features, .. } => out_features,
            LayerKind::Conv2d { out_channels, .. } => out_channels,
        }
    }
}

/// What one adapter changes in a layer, at a given user weight.
#[derive(Debug, Clone, Default)]
pub struct PatchDelta {
    /// Added to the weight; in the base weight's shape, f32.
    pub weight: Option<Tensor>,
    /// Added to the bias (a layer without one gains it); `[out]`, f32.
    pub bias: Option<Tensor>,
}

/// An adapter merged into a layer: computes its change from the layer's base weight (f32, on the
/// layer's device) at the user's `weight`.
pub trait Patch: std::fmt::Debug + Send + Sync {
    fn delta(&self, base: &Tensor, weight: f64) -> Result<PatchDelta>;
}

/// A low-rank pair: `scale · weight · up @ down`, reshaped to the base weight's shape. Linear
/// LoRAs on 1×1 convolutions and conv-shaped LoRAs on linear layers (both occur in kohya files)
/// reshape cleanly.
#[derive(Debug, Clone)]
pub struct LowRank {
    /// `[rank, in]` or `[rank, in, k, k]`.
    pub down: Tensor,
    /// `[out, rank]` or `[out, rank, 1, 1]`.
    pub up: Tensor,
    /// alpha / rank (1 when alpha is absent).
    pub scale: f64,
}

impl Patch for LowRank {
    fn delta(&self, base: &Tensor, weight: f64) -> Result<PatchDelta> {
        let rank = self.down.dim(0)?;
        let down2 = self.down.reshape((rank, self.down.elem_count() / rank))?;
        let up2 = self.up.reshape((self.up.dim(0)?, self.up.elem_count() / self.up.dim(0)?))?;
        let d = up2.matmul(&down2)?;
        if d.elem_count() != base.elem_count() {
            return Err(Error::invalid(format!("LoRA delta {:?} does not fit the weight {:?}", d.dims(), base.dims())));
        }
        Ok(PatchDelta { weight: Some((d.reshape(base.shape())? * (self.scale * weight))?), bias: None })
    }
}

/// A patch merged into a layer at a user weight.
#[derive(Debug, Clone)]
pub struct MergedDelta {
    pub patch: Arc<dyn Patch>,
    pub weight: f64,
}

impl MergedDelta {
    /// A plain LoRA pair at `scale` (alpha / rank times the user's weight).
    pub fn low_rank(down: Tensor, up: Tensor, scale: f64) -> Self {
        MergedDelta { patch: Arc::new(LowRank { down, up, scale }), weight: 1.0 }
    }
}

/// A trainable adapter that runs unmerged in the forward pass.
#[derive(Debug, Clone)]
pub struct LiveAdapter {
    /// `[rank, in]` for linear layers, `[rank, in, k, k]` for convolutions.
    pub down: Var,
    /// `[out, rank]` for linear layers, `[out, rank, 1, 1]` for convolutions.
    pub up: Var,
    pub scale: f64,
}

#[derive(Debug)]
struct LayerState {
    effective: Tensor,
    effective_bias: Option<Tensor>,
    merged: Vec<MergedDelta>,
    live: Vec<LiveAdapter>,
}

/// One patchable layer, shared between the model that runs it and the registry that patches it.
#[derive(Debug)]
pub struct AdaptableLayer {
    pub path: String,
    pub kind: LayerKind,
    base: Tensor,
    base_bias: Option<Tensor>,
    state: RwLock<LayerState>,
}

impl AdaptableLayer {
    pub fn new(path: String, kind: LayerKind, base: Tensor, base_bias: Option<Tensor>) -> Arc<Self> {
        let state = LayerState { effective: base.clone(), effective_bias: base_bias.clone(), merged: Vec::new(), live: Vec::new() };
        Arc::new(AdaptableLayer { path, kind, base, base_bias, state: RwLock::new(state) })
    }

    pub fn base_weight(&self) -> &Tensor {
        &self.base
    }

    pub fn base_bias(&self) -> Option<&Tensor> {
        self.base_bias.as_ref()
    }

    /// The weight the forward pass uses: base plus merged deltas.
    pub fn effective_weight(&self) -> Tensor {
        self.state.read().expect("adapter lock poisoned").effective.clone()
    }

    /// The bias the forward pass uses: base plus merged bias deltas.
    pub fn effective_bias(&self) -> Option<Tensor> {
        self.state.read().expect("adapter lock poisoned").effective_bias.clone()
    }

    pub fn live_adapters(&self) -> Vec<LiveAdapter> {
        self.state.read().expect("adapter lock poisoned").live.clone()
    }

    pub fn merged_count(&self) -> usize {
        self.state.read().expect("adapter lock poisoned").merged.len()
    }

    /// Replaces the merged deltas and recomputes the effective weight and bias: the base plus
    /// each patch's change, every change computed from the base weight in f32, the sum cast to
    /// the base's dtype.
    pub fn set_merged(&self, deltas: Vec<MergedDelta>) -> Result<()> {
        let (effective, effective_bias) = if deltas.is_empty() {
            (self.base.clone(), self.base_bias.clone())
        } else {
            let dtype = self.base.dtype();
            let base = self.base.to_dtype(DType::F32)?;
            let mut w = base.clone();
            let mut b = self.base_bias.as_ref().map(|b| b.to_dtype(DType::F32)).transpose()?;
            for d in &deltas {
                let change = d.patch.delta(&base, d.weight)?;
                if let Some(dw) = change.weight {
                    if dw.dims() != base.dims() {
                        return Err(Error::invalid(format!("{}: adapter delta {:?} does not fit the weight {:?}", self.path, dw.dims(), base.dims())));
                    }
                    w = (w + dw.to_dtype(DType::F32)?)?;
                }
                if let Some(db) = change.bias {
                    let out = self.kind.out_dim();
                    if db.dims() != [out] {
                        return Err(Error::invalid(format!("{}: adapter bias delta {:?} does not fit the {out} outputs", self.path, db.dims())));
                    }
                    b = Some(match b {
                        Some(b) => (b + db)?,
                        None => db,
                    });
                }
            }
            // A fresh weight tensor even when only the bias changed: its id is what the
            // forward pass's caches (attention's context keys and values, convolution kernel
            // layouts) are keyed on.
            let w = if w.id() == base.id() { w.copy()? } else { w };
            (w.to_dtype(dtype)?, b.map(|b| b.to_dtype(dtype)).transpose()?)
        };
        let mut st = self.state.write().expect("adapter lock poisoned");
        st.effective = effective;
        st.effective_bias = effective_bias;
        st.merged = deltas;
        Ok(())
    }

    pub fn set_live(&self, adapters: Vec<LiveAdapter>) {
        self.state.write().expect("adapter lock poisoned").live = adapters;
    }
}

/// All patchable layers of a model component, by state-dict path.
#[derive(Debug, Default, Clone)]
pub struct AdapterTargets {
    layers: BTreeMap<String, Arc<AdaptableLayer>>,
}

impl AdapterTargets {
    pub fn register(&mut self, layer: Arc<AdaptableLayer>) {
        self.layers.insert(layer.path.clone(), layer);
    }

    pub fn get(&self, path: &str) -> Option<&Arc<AdaptableLayer>> {
        self.layers.get(path)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<AdaptableLayer>)> {
        self.layers.iter()
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Adds all layers of `other` under `prefix.` (`unet.`, `text_encoder.`).
    pub fn extend_prefixed(&mut self, prefix: &str, other: &AdapterTargets) {
        for layer in other.layers.values() {
            self.layers.insert(format!("{prefix}.{}", layer.path), layer.clone());
        }
    }

    /// Removes every merged and live adapter: the model is the base model again.
    pub fn clear(&self) -> Result<()> {
        for layer in self.layers.values() {
            layer.set_merged(Vec::new())?;
            layer.set_live(Vec::new());
        }
        Ok(())
    }
}
