//! The layers a LoRA can patch, and how patches are applied.
//!
//! Every `Linear` and `Conv2d` a model builds is registered here under its state-dict path
//! (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`). A layer keeps its base weight
//! untouched and an *effective* weight that is the base plus the weighted sum of all LoRA deltas
//! merged into it, so changing a LoRA's weight recomputes a few small matrix products and never
//! reloads the model. For training, a layer can also carry *live* adapters: trainable down/up
//! matrices that run in the forward pass unmerged, so gradients reach them.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use candle_core::{Tensor, Var};

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

/// A merged LoRA delta: `scale * up @ down`, reshaped to the base weight's shape.
#[derive(Debug, Clone)]
pub struct MergedDelta {
    pub down: Tensor,
    pub up: Tensor,
    /// alpha / rank (1 when alpha is absent) times the user's weight.
    pub scale: f64,
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
    merged: Vec<MergedDelta>,
    live: Vec<LiveAdapter>,
}

/// One patchable layer, shared between the model that runs it and the registry that patches it.
#[derive(Debug)]
pub struct AdaptableLayer {
    pub path: String,
    pub kind: LayerKind,
    base: Tensor,
    state: RwLock<LayerState>,
}

impl AdaptableLayer {
    pub fn new(path: String, kind: LayerKind, base: Tensor) -> Arc<Self> {
        let state = LayerState { effective: base.clone(), merged: Vec::new(), live: Vec::new() };
        Arc::new(AdaptableLayer { path, kind, base, state: RwLock::new(state) })
    }

    pub fn base_weight(&self) -> &Tensor {
        &self.base
    }

    /// The weight the forward pass uses: base plus merged deltas.
    pub fn effective_weight(&self) -> Tensor {
        self.state.read().expect("adapter lock poisoned").effective.clone()
    }

    pub fn live_adapters(&self) -> Vec<LiveAdapter> {
        self.state.read().expect("adapter lock poisoned").live.clone()
    }

    pub fn merged_count(&self) -> usize {
        self.state.read().expect("adapter lock poisoned").merged.len()
    }

    /// Replaces the merged deltas and recomputes the effective weight.
    pub fn set_merged(&self, deltas: Vec<MergedDelta>) -> Result<()> {
        let mut effective = self.base.clone();
        for d in &deltas {
            effective = (effective + self.delta(&d.down, &d.up, d.scale)?)?;
        }
        let mut st = self.state.write().expect("adapter lock poisoned");
        st.effective = effective;
        st.merged = deltas;
        Ok(())
    }

    pub fn set_live(&self, adapters: Vec<LiveAdapter>) {
        self.state.write().expect("adapter lock poisoned").live = adapters;
    }

    /// `scale * up @ down` in the base weight's shape. Linear LoRAs on 1×1 convolutions and
    /// conv-shaped LoRAs on linear layers (both occur in kohya files) reshape cleanly.
    pub fn delta(&self, down: &Tensor, up: &Tensor, scale: f64) -> Result<Tensor> {
        let rank = down.dim(0)?;
        let down2 = down.reshape((rank, down.elem_count() / rank))?;
        let up2 = up.reshape((up.dim(0)?, up.elem_count() / up.dim(0)?))?;
        let d = up2.matmul(&down2)?;
        if d.elem_count() != self.base.elem_count() {
            return Err(Error::invalid(format!(
                "{}: LoRA delta {:?} does not fit the weight {:?}",
                self.path,
                d.dims(),
                self.base.dims()
            )));
        }
        Ok((d.reshape(self.base.shape())? * scale)?)
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
