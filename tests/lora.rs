//! LoRA files: key mapping across kohya, diffusers and PEFT; every kind of bad file fails with
//! a message that says what is wrong; arbitrary bytes never panic the reader.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{shared_loras, tiny};
use loragate::Error;
use loragate::lora::export::{ExportModule, to_tensors};
use loragate::lora::{Component, KeyStyle, LoraFile, LoraStack};
use loragate::tensors::{SaveDtype, serialize};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn bytes_of(tensors: &BTreeMap<String, Tensor>) -> Vec<u8> {
    serialize(tensors, &BTreeMap::new(), SaveDtype::F32).unwrap()
}

fn load_bytes(name: &str, bytes: &[u8]) -> loragate::Result<LoraFile> {
    LoraFile::from_bytes(Path::new(name), bytes)
}

fn real_kohya() -> Vec<u8> {
    std::fs::read(shared_loras().join("zorb.kohya.safetensors")).unwrap()
}

/// A matrix with a recognisable value pattern.
fn matrix(rows: usize, cols: usize, seed: f32) -> Tensor {
    let v: Vec<f32> = (0..rows * cols).map(|i| ((i as f32 * 0.37 + seed).sin()) * 0.05).collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

#[test]
fn key_mapping_is_the_same_for_kohya_diffusers_and_peft() {
    let pipe = tiny();
    // Every patchable linear layer of the UNet and the text encoder.
    let layers: Vec<(Component, String, usize, usize)> = pipe
        .targets()
        .iter()
        .filter_map(|(key, layer)| {
            let (component, path) = if let Some(p) = key.strip_prefix("unet.") {
                (Component::Unet, p)
            } else {
                (Component::TextEncoder, key.strip_prefix("text_encoder.")?)
            };
            match layer.kind {
                loragate::model::adapters::LayerKind::Linear { in_features, out_features } => {
                    Some((component, path.to_string(), in_features, out_features))
                }
                _ => None,
            }
        })
        .collect();
    assert!(layers.len() > 100, "expected many linear layers, got {}", layers.len());
    let strategy = (
        proptest::sample::subsequence(layers.clone(), 1..6),
        prop_oneof![Just(KeyStyle::Kohya), Just(KeyStyle::Diffusers), Just(KeyStyle::Peft)],
        1usize..5,
        prop_oneof![Just(1.0f64), Just(4.0), Just(8.0), Just(0.5)],
    );
    let mut runner = TestRunner::new(Config { cases: 48, ..Config::default() });
    runner
        .run(&strategy, |(chosen, style, rank, alpha)| {
            let modules: Vec<ExportModule> = chosen
                .iter()
                .enumerate()
                .map(|(i, (c, path, i_f, o_f))| ExportModule {
                    component: *c,
                    path: path.clone(),
                    down: matrix(rank, *i_f, i as f32),
                    up: matrix(*o_f, rank, i as f32 + 0.5),
                    alpha,
                })
                .collect();
            let bytes = bytes_of(&to_tensors(&modules, style).unwrap());
            let lora = load_bytes("prop.safetensors", &bytes).unwrap();
            prop_assert_eq!(lora.modules.len(), modules.len());
            let stack = LoraStack::resolve(&pipe, &[(&lora, 0.75)]).unwrap();
            let bound = &stack.loras[0].0.modules;
            for m in &modules {
                let key = format!("{}.{}", m.component.prefix(), m.path);
                let b = bound.iter().find(|b| b.target == key);
                prop_assert!(b.is_some(), "{} was not bound", key);
                // PEFT keeps alpha outside the tensors: without a config the scale is 1.
                let want = if style == KeyStyle::Peft { 1.0 } else { alpha / rank as f64 };
                prop_assert!((b.unwrap().scale - want).abs() < 1e-9);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn peft_alpha_comes_from_adapter_config() {
    let pipe = tiny();
    let dir = tempdir("peft");
    let path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let module = ExportModule { component: Component::Unet, path: path.into(), down: matrix(4, 64, 0.0), up: matrix(64, 4, 1.0), alpha: 8.0 };
    let mut t = to_tensors(&[module], KeyStyle::Peft).unwrap();
    // PEFT's own naming: base_model.model.<path>.lora_A.weight
    let t2: BTreeMap<String, Tensor> = t.iter_mut().map(|(k, v)| (k.replacen("unet.", "base_model.model.", 1), v.clone())).collect();
    std::fs::write(dir.join("adapter_model.safetensors"), bytes_of(&t2)).unwrap();
    std::fs::write(dir.join("adapter_config.json"), r#"{"peft_type":"LORA","r":4,"lora_alpha":8}"#).unwrap();
    let lora = LoraFile::load(&dir.join("adapter_model.safetensors")).unwrap();
    let stack = LoraStack::resolve(&pipe, &[(&lora, 1.0)]).unwrap();
    assert_eq!(stack.loras[0].0.modules[0].scale, 2.0);
}

#[test]
fn merged_weights_are_base_plus_scaled_products_for_stacked_loras() {
    let pipe = tiny();
    let path = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v";
    let key = format!("unet.{path}");
    let layer = pipe.targets().get(&key).unwrap().clone();
    let (i_f, o_f) = (layer.kind.in_dim(), layer.kind.out_dim());
    let make = |seed: f32, alpha: f64, style| {
        let m = ExportModule { component: Component::Unet, path: path.into(), down: matrix(2, i_f, seed), up: matrix(o_f, 2, seed + 1.0), alpha };
        load_bytes("s.safetensors", &bytes_of(&to_tensors(&[m], style).unwrap())).unwrap()
    };
    let a = make(0.0, 2.0, KeyStyle::Kohya); // scale 1
    let b = make(3.0, 1.0, KeyStyle::Diffusers); // scale 0.5
    let stack = LoraStack::resolve(&pipe, &[(&a, 0.7), (&b, 0.3)]).unwrap();
    stack.apply(&pipe).unwrap();
    let product = |l: &LoraFile| {
        let (down, up) = l.modules[0].low_rank().unwrap();
        up.matmul(down).unwrap()
    };
    let (da, db) = (product(&a), product(&b));
    let want = ((layer.base_weight() + (da * 0.7).unwrap()).unwrap() + (db * 0.15).unwrap()).unwrap();
    let d = common::max_abs_diff(&layer.effective_weight(), &want);
    assert!(d < 1e-6, "merged weight off by {d}");
    LoraStack::default().apply(&pipe).unwrap();
    assert_eq!(common::max_abs_diff(&layer.effective_weight(), layer.base_weight()), 0.0);
}

fn expect_err(result: loragate::Result<LoraFile>, needles: &[&str]) -> String {
    let e = match result {
        Ok(_) => panic!("expected an error mentioning {needles:?}"),
        Err(e) => e,
    };
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} should mention {n:?}");
    }
    assert_eq!(e.exit_code(), loragate::ExitCode::Usage, "{msg}");
    msg
}

#[test]
fn truncated_file_is_an_error_not_a_panic() {
    let bytes = real_kohya();
    for cut in [0, 4, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        expect_err(load_bytes("cut.safetensors", &bytes[..cut]), &["cut.safetensors", "not a readable safetensors file"]);
    }
}

#[test]
fn corrupt_header_is_an_error() {
    let mut bytes = real_kohya();
    bytes[12] = b'#';
    expect_err(load_bytes("bad.safetensors", &bytes), &["bad.safetensors", "safetensors"]);
}

#[test]
fn nan_and_inf_values_are_errors_naming_the_tensor() {
    let mut t = BTreeMap::new();
    t.insert("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight".to_string(), Tensor::new(&[[f32::NAN, 0.0]], &Device::Cpu).unwrap());
    t.insert("lora_unet_mid_block_attentions_0_proj_in.lora_up.weight".to_string(), Tensor::new(&[[0.0f32], [1.0]], &Device::Cpu).unwrap());
    expect_err(load_bytes("nan.safetensors", &bytes_of(&t)), &["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight", "NaN"]);
    let mut t2 = t.clone();
    t2.insert("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight".to_string(), Tensor::new(&[[f32::INFINITY, 0.0]], &Device::Cpu).unwrap());
    expect_err(load_bytes("inf.safetensors", &bytes_of(&t2)), &["infinite"]);
}

#[test]
fn tensors_that_are_not_lora_tensors_are_errors() {
    let mut t = BTreeMap::new();
    t.insert("model.diffusion_model.out.2.weight".to_string(), matrix(2, 2, 0.0));
    expect_err(load_bytes("ckpt.safetensors", &bytes_of(&t)), &["not LoRA tensors", "model.diffusion_model.out.2.weight"]);
    expect_err(load_bytes("empty.safetensors", &bytes_of(&BTreeMap::new())), &["no tensors"]);
}

#[test]
fn half_modules_and_rank_disagreements_are_errors() {
    let mut t = BTreeMap::new();
    t.insert("unet.mid_block.attentions.0.proj_in.lora.down.weight".to_string(), matrix(4, 128, 0.0));
    expect_err(load_bytes("half.safetensors", &bytes_of(&t)), &["no up matrix"]);
    t.insert("unet.mid_block.attentions.0.proj_in.lora.up.weight".to_string(), matrix(128, 3, 0.0));
    expect_err(load_bytes("rank.safetensors", &bytes_of(&t)), &["disagree on the rank"]);
}

#[test]
fn an_incomplete_lycoris_module_is_refused_naming_what_is_missing() {
    let mut t = BTreeMap::new();
    t.insert("lora_unet_mid_block_attentions_0_proj_in.hada_w1_a".to_string(), matrix(4, 4, 0.0));
    expect_err(load_bytes("loha.safetensors", &bytes_of(&t)), &["LoHa", "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a", "no `hada_w1_b`"]);
}

#[test]
fn a_module_the_model_lacks_is_an_error_naming_it() {
    let pipe = tiny();
    let mut t = BTreeMap::new();
    for (k, v) in LoraFile::load(&shared_loras().join("zorb.kohya.safetensors")).unwrap().modules.iter().take(1).flat_map(|m| {
        let name = m.name.as_str().to_string();
        let (down, up) = m.low_rank().unwrap();
        vec![(format!("lora_unet_{name}.lora_down.weight"), down.clone()), (format!("lora_unet_{name}.lora_up.weight"), up.clone())]
    }) {
        t.insert(k, v);
    }
    t.insert("lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight".into(), matrix(4, 64, 0.0));
    t.insert("lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight".into(), matrix(64, 4, 0.0));
    let lora = load_bytes("extra.safetensors", &bytes_of(&t)).unwrap();
    let err = LoraStack::resolve(&pipe, &[(&lora, 1.0)]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::LoraMismatch { .. }), "{msg}");
    assert!(msg.contains("1 of 2 modules match no layer") && msg.contains("lora_unet_down_blocks_7_attentions_0_proj_in"), "{msg}");
}

#[test]
fn a_lora_for_another_family_names_module_shapes_and_family() {
    let pipe = tiny();
    // An SD 1.5 LoRA: cross-attention keys read 768-wide text.
    let m = ExportModule {
        component: Component::Unet,
        path: "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k".into(),
        down: matrix(4, 768, 0.0),
        up: matrix(64, 4, 0.0),
        alpha: 4.0,
    };
    let lora = load_bytes("sd15.safetensors", &bytes_of(&to_tensors(&[m], KeyStyle::Kohya).unwrap())).unwrap();
    let msg = LoraStack::resolve(&pipe, &[(&lora, 1.0)]).unwrap_err().to_string();
    for needle in ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "[4, 768]", "192", "SD 1.x", "tiny-sd"] {
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    }
}

#[test]
fn kohya_and_diffusers_zorb_files_agree() {
    let k = LoraFile::load(&shared_loras().join("zorb.kohya.safetensors")).unwrap();
    let d = LoraFile::load(&shared_loras().join("zorb.diffusers.safetensors")).unwrap();
    assert_eq!(k.format, loragate::lora::LoraFormat::Kohya);
    assert_eq!(d.format, loragate::lora::LoraFormat::Diffusers);
    assert_eq!(k.modules.len(), 56);
    assert_eq!(d.modules.len(), 56);
    assert!(k.modules.iter().all(|m| m.alpha == Some(4.0) && m.rank() == Some(4)));
    assert!(d.modules.iter().all(|m| m.alpha.is_none()));
}

proptest! {
    #![proptest_config(Config { cases: 400, ..Config::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_reader(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = load_bytes("fuzz.safetensors", &bytes);
    }

    #[test]
    fn arbitrary_headers_never_panic_the_reader(header in "\\PC{0,200}", tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend(tail);
        let _ = load_bytes("fuzz.safetensors", &bytes);
    }

    #[test]
    fn mutated_real_files_never_panic_the_reader(pos in 0usize..2000, value in any::<u8>(), cut in 0usize..130_000) {
        let mut bytes = real_kohya();
        let p = pos.min(bytes.len() - 1);
        bytes[p] = value;
        bytes.truncate(cut.max(1).min(bytes.len()));
        let _ = load_bytes("fuzz.safetensors", &bytes);
    }
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("loragate-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
