//! Single-file checkpoints of any architecture: configs from `--config` (a diffusers folder or an
//! LDM original_config YAML) as diffusers' `from_single_file(..., config=...)` takes them,
//! `loragate convert` both ways, errors in the file's own key names, and unused tensors reported.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use loragate::model::locate::{assets_dir, resolve_model_with_config};
use loragate::model::{GenerationParams, Pipeline};
use loragate::tensors::{SaveDtype, TensorFile};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loragate-single-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny_folder() -> PathBuf {
    assets_dir().unwrap().join("tiny-sd")
}

/// tiny-sd as an LDM single file with no configs in it, as a tool other than loragate writes
/// one: the tensors under their A1111 names, nothing else.
fn bare_ldm_file(dir: &Path, extra: &[(&str, Tensor)], edit: impl Fn(&mut BTreeMap<String, Tensor>)) -> PathBuf {
    let with_configs = dir.join("with-configs.safetensors");
    loragate::model::single_file::write_from_folder(&tiny_folder(), &with_configs).unwrap();
    let mut tensors: BTreeMap<String, Tensor> = TensorFile::load(&with_configs, DType::F32, &Device::Cpu).unwrap().tensors.into_iter().collect();
    for (k, t) in extra {
        tensors.insert(k.to_string(), t.clone());
    }
    edit(&mut tensors);
    let bare = dir.join("tiny-ldm.safetensors");
    loragate::tensors::save(&bare, &tensors, &BTreeMap::new(), SaveDtype::F16).unwrap();
    bare
}

fn generate(pipe: &Pipeline) -> Tensor {
    let params = GenerationParams { steps: 4, ..Default::default() };
    pipe.generate(&["yellow triangle, large, at the bottom, night background"], &[5], &params, &mut |_, _| {}).unwrap()
}

fn loragate(args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_loragate")).args(args).output().unwrap();
    (o.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

#[test]
fn a_single_file_of_an_unknown_architecture_loads_with_config_from_a_folder() {
    let dir = tmp("config");
    let file = bare_ldm_file(&dir, &[], |_| {});
    // Without configs: refused, saying how to give them.
    let err = Pipeline::load(&resolve_model_with_config(file.to_str().unwrap(), None).unwrap(), DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("text width 192") && err.contains("--config"), "{err}");
    // With the folder's configs: the folder's images exactly.
    let loc = resolve_model_with_config(file.to_str().unwrap(), Some(tiny_folder().to_str().unwrap())).unwrap();
    let from_file = Pipeline::load(&loc, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(common::max_abs_diff(&generate(&from_file), &generate(&common::tiny())), 0.0);
    // The configs are part of the model's identity (the cache key).
    let fp_with = loragate::model::pipeline::model_fingerprint(&loc).unwrap();
    let mut other = loc.clone();
    other.config = None;
    assert_ne!(fp_with, loragate::model::pipeline::model_fingerprint(&other).unwrap());
    // Through the CLI, and the same configs from an LDM original_config cannot describe the
    // shapes world's own text encoder: that error says to give a folder.
    let out = dir.join("gen.png");
    let (code, text) = loragate(&["generate", "red circle", "--model", file.to_str().unwrap(), "--config", tiny_folder().to_str().unwrap(), "--steps", "2", "-o", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(out.is_file());
}

#[test]
fn an_ldm_original_config_gives_the_unet_and_vae_architecture() {
    // tiny-sd's architecture numbers, as an LDM config would write them.
    let dir = tmp("yaml");
    let yaml = dir.join("tiny-inference.yaml");
    std::fs::write(
        &yaml,
        "model:\n  params:\n    linear_start: 0.00085\n    linear_end: 0.012\n    scale_factor: 0.18215\n    unet_config:\n      params:\n        image_size: 16\n        in_channels: 4\n        out_channels: 4\n        model_channels: 64\n        attention_resolutions: [1, 2]\n        num_res_blocks: 1\n        channel_mult: [1, 2, 2]\n        num_heads: 4\n        transformer_depth: 1\n        context_dim: 192\n    first_stage_config:\n      params:\n        ddconfig: { z_channels: 4, resolution: 128, in_channels: 3, out_ch: 3, ch: 32, ch_mult: [1, 2, 2, 2], num_res_blocks: 1 }\n    cond_stage_config:\n      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n",
    )
    .unwrap();
    let l = loragate::model::ldm_config::read(&yaml).unwrap();
    let folder_unet: loragate::model::unet::UNetConfig = loragate::model::loading::read_config(&tiny_folder().join("unet/config.json")).unwrap();
    assert_eq!(l.unet.block_out_channels, folder_unet.block_out_channels);
    assert_eq!(l.unet.down_block_types, folder_unet.down_block_types);
    assert_eq!(l.unet.up_block_types, folder_unet.up_block_types);
    assert_eq!(l.unet.attention_head_dim, folder_unet.attention_head_dim);
    let folder_vae: loragate::model::vae::VaeConfig = loragate::model::loading::read_config(&tiny_folder().join("vae/config.json")).unwrap();
    assert_eq!(l.vae.block_out_channels, folder_vae.block_out_channels);
    assert_eq!(l.vae.layers_per_block, folder_vae.layers_per_block);
    // The UNet and VAE fit the file; its 192-wide text encoder is not OpenAI CLIP's, so the
    // shapes check names the file's own key and the diffusers name.
    let file = bare_ldm_file(&dir, &[], |_| {});
    let loc = resolve_model_with_config(file.to_str().unwrap(), Some(yaml.to_str().unwrap())).unwrap();
    let err = Pipeline::load(&loc, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(
        err.contains("the text encoder tensors do not fit") && err.contains("`cond_stage_model.transformer.text_model.encoder.layers.0.layer_norm1.weight` [text_model.encoder.layers.0.layer_norm1.weight] has shape [192], the architecture needs [768]"),
        "{err}"
    );
}

#[test]
fn errors_name_the_key_as_the_file_spells_it_and_say_why_the_family_was_chosen() {
    let dir = tmp("errors");
    // A UNet tensor of the wrong shape.
    let file = bare_ldm_file(&dir, &[], |t| {
        t.insert("model.diffusion_model.input_blocks.1.0.in_layers.2.weight".into(), Tensor::zeros((64, 64, 1, 1), DType::F32, &Device::Cpu).unwrap());
    });
    let loc = resolve_model_with_config(file.to_str().unwrap(), Some(tiny_folder().to_str().unwrap())).unwrap();
    let err = Pipeline::load(&loc, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(
        err.contains("`model.diffusion_model.input_blocks.1.0.in_layers.2.weight` [down_blocks.0.resnets.0.conv1.weight] has shape [64, 64, 1, 1], the architecture needs [64, 64, 3, 3]"),
        "{err}"
    );
    // A text encoder spelled like SD 2.x's on an SD 1.x-shaped UNet (width 768).
    let mut shapes = BTreeMap::new();
    shapes.insert("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight".to_string(), vec![320, 768]);
    shapes.insert("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight".to_string(), vec![3072, 1024]);
    let err = loragate::model::single_file::detect_family_explained(&shapes).unwrap_err().to_string();
    assert!(
        err.contains("its text encoder is spelled like SD 2.x's (OpenCLIP, `cond_stage_model.model.*`), but its UNet is SD 1.x shaped (cross-attention width 768)"),
        "{err}"
    );
}

#[test]
fn unused_tensors_are_reported_and_known_buffers_stay_quiet() {
    let dir = tmp("unused");
    let extra = [
        ("betas", Tensor::zeros(1000, DType::F32, &Device::Cpu).unwrap()),
        ("alphas_cumprod", Tensor::zeros(1000, DType::F32, &Device::Cpu).unwrap()),
        ("model_ema.decay", Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap()),
        ("control_model.zero_convs.0.0.weight", Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap()),
    ];
    let file = bare_ldm_file(&dir, &extra, |_| {});
    let parts = loragate::model::single_file::convert(&file, DType::F32, &Device::Cpu, Some(&tiny_folder())).unwrap();
    assert_eq!(parts.unused, vec!["control_model.zero_convs.0.0.weight".to_string()]);
    let out = dir.join("gen.png");
    let (code, text) = loragate(&["generate", "red circle", "--model", file.to_str().unwrap(), "--config", tiny_folder().to_str().unwrap(), "--steps", "2", "-o", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("1 tensors are not used by the architecture the configs describe (first: control_model.zero_convs.0.0.weight)"), "{text}");
    assert!(!text.contains("betas"), "{text}");
}

/// Every file under `dir`, relative, with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            for (k, v) in files(&p) {
                out.insert(format!("{}/{k}", e.file_name().to_string_lossy()), v);
            }
        } else {
            out.insert(e.file_name().to_string_lossy().into_owned(), std::fs::read(&p).unwrap());
        }
    }
    out
}

#[test]
fn convert_round_trips_a_folder_through_a_single_file_bit_for_bit() {
    let dir = tmp("convert");
    let single = dir.join("tiny.safetensors");
    let back = dir.join("tiny-back");
    let (code, text) = loragate(&["convert", tiny_folder().to_str().unwrap(), "--to", "single-file", "--out", single.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = loragate(&["convert", single.to_str().unwrap(), "--out", back.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    let (orig, round) = (files(&tiny_folder()), files(&back));
    for (rel, bytes) in &orig {
        if rel.ends_with(".safetensors") {
            // The same tensors, dtype and bits (the file's own header order may differ).
            let a = TensorFile::load(tiny_folder().join(rel), DType::F16, &Device::Cpu).unwrap().tensors;
            let b = TensorFile::load(back.join(rel), DType::F16, &Device::Cpu).unwrap().tensors;
            assert_eq!(a.len(), b.len(), "{rel}");
            for (k, t) in &a {
                let u = &b[k];
                let bits = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(t), bits(u), "{rel}: {k}");
            }
            assert_eq!(loragate::tensors::dominant_dtype(&back.join(rel)).unwrap(), DType::F16, "{rel} keeps its dtype");
        } else {
            assert_eq!(round.get(rel), Some(bytes), "{rel} differs after the round trip");
        }
    }
    // A converted folder loads and draws what the original does.
    let pipe = Pipeline::load(&loragate::model::locate::resolve_model(back.to_str().unwrap()).unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(common::max_abs_diff(&generate(&pipe), &generate(&common::tiny())), 0.0);
    // A folder given where a file is expected, and --config on a folder, are usage errors.
    assert_eq!(loragate(&["convert", tiny_folder().to_str().unwrap(), "--out", dir.join("x").to_str().unwrap()]).0, 2);
}

/// The single file `convert --to single-file` writes holds exactly the tensors of the file that
/// diffusers opened with `from_single_file(file, config=folder)` and read back as the folder's
/// own weights (572 of 572 identical; `tests/fixtures/single_file/make.py` made the fixture with
/// diffusers 0.42). A change to the writer fails here until diffusers has opened its output.
#[test]
fn the_single_file_convert_writes_is_the_one_diffusers_opened() {
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixtures().join("single_file").join("diffusers_opened.json")).unwrap()).unwrap();
    assert_eq!(fixture["max_abs_diff"].as_f64(), Some(0.0));
    assert_eq!(fixture["compared_tensors"].as_u64(), Some(572), "unet, vae and text encoder all compared");
    let want = fixture["tensors"].as_object().unwrap();
    let dir = tmp("diffusers-opened");
    let single = dir.join("tiny.safetensors");
    let (code, text) = loragate(&["convert", tiny_folder().to_str().unwrap(), "--to", "single-file", "--out", single.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    let got = TensorFile::load(&single, DType::F32, &Device::Cpu).unwrap().tensors;
    let got_keys: std::collections::BTreeSet<&String> = got.keys().collect();
    let want_keys: std::collections::BTreeSet<&String> = want.keys().collect();
    assert_eq!(got_keys, want_keys, "the file's tensor names");
    for (key, t) in &got {
        let w = want[key].as_array().unwrap();
        let shape: Vec<usize> = w[0].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(t.dims(), shape.as_slice(), "{key}");
        let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (sum, sq) = values.iter().fold((0f64, 0f64), |(s, q), &v| (s + v as f64, q + v as f64 * v as f64));
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + b.abs());
        assert!(close(sum, w[1].as_f64().unwrap()) && close(sq, w[2].as_f64().unwrap()), "{key}: other values than diffusers opened");
    }
}
