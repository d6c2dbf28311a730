//! The fused CPU kernels are inference-only: with trainable (live) LoRA adapters on every
//! layer, each forward must take the differentiable path so that every adapter matrix gets a
//! gradient.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use loragate::model::adapters::{LayerKind, LiveAdapter};
use loragate::model::text_encoder::LayerChoice;

fn var(shape: &[usize], seed: u64) -> Var {
    let mut rng = loragate::model::noise::Rng::new(seed);
    let t = loragate::model::noise::randn(&mut rng, shape, &Device::Cpu).unwrap();
    Var::from_tensor(&(t * 0.05).unwrap()).unwrap()
}

fn adapter(kind: LayerKind, seed: u64) -> LiveAdapter {
    const RANK: usize = 2;
    let (down, up) = match kind {
        LayerKind::Linear { in_features, out_features } => (vec![RANK, in_features], vec![out_features, RANK]),
        LayerKind::Conv2d { in_channels, out_channels, kernel } => {
            (vec![RANK, in_channels, kernel, kernel], vec![out_channels, RANK, 1, 1])
        }
    };
    // Both matrices non-zero, so that both get a non-zero gradient.
    LiveAdapter { down: var(&down, seed), up: var(&up, seed + 1), scale: 1.0 }
}

#[test]
fn live_adapters_on_every_unet_and_text_encoder_layer_get_gradients() {
    let pipe = common::tiny();
    let mut adapters = Vec::new();
    for (i, (name, layer)) in pipe.targets().iter().enumerate() {
        if name.starts_with("unet.") || name.starts_with("text_encoder.") {
            let a = adapter(layer.kind, 2 * i as u64);
            layer.set_live(vec![a.clone()]);
            adapters.push((name.clone(), a));
        }
    }
    assert!(adapters.len() > 50, "only {} adapters", adapters.len());

    let ids: Vec<u32> = pipe.tokenizer.encode("red circle, large").ids.to_vec();
    let n = ids.len();
    let ids = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
    let text = pipe.text_encoder.forward(&ids, LayerChoice::LAST).unwrap().hidden;
    let ctx = text.broadcast_as((2, text.dim(1).unwrap(), text.dim(2).unwrap())).unwrap().contiguous().unwrap();
    let mut rng = loragate::model::noise::Rng::new(9);
    let x = loragate::model::noise::randn(&mut rng, &[2, 4, 16, 16], &Device::Cpu).unwrap();
    let t = Tensor::new(&[900f32, 300.0], &Device::Cpu).unwrap();
    let eps = pipe.unet.forward(&x, &t, &ctx, None).unwrap();
    let loss = eps.sqr().unwrap().sum_all().unwrap().to_dtype(DType::F32).unwrap();
    let grads = loss.backward().unwrap();
    let mut missing = Vec::new();
    for (name, a) in &adapters {
        for (which, m) in [("down", &a.down), ("up", &a.up)] {
            let ok = grads
                .get(m.as_tensor())
                .map(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0)
                .unwrap_or(false);
            if !ok {
                missing.push(format!("{name}.{which}"));
            }
        }
    }
    pipe.targets().clear().unwrap();
    assert!(missing.is_empty(), "no gradient for {} matrices: {:?}", missing.len(), missing);
}
