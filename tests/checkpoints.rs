//! Real checkpoints without real weights: full-size SD 1.5, 2.x and XL architectures with random
//! weights (shapes, one forward each), key layouts checked against names and shapes of the
//! published single files, round trips of tiny-sd through an A1111-style single file and a
//! Hugging Face cache tree, CLIP scorer layouts, and LoRAs refused across families.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use loragate::lora::export::{ExportModule, to_tensors};
use loragate::lora::{Component, KeyStyle, LoraFile, LoraStack};
use loragate::model::adapters::AdapterTargets;
use loragate::model::params::{Params, WeightStore};
use loragate::model::single_file::{text_parameters, unet_key_map, unet_parameters, vae_ldm_key, vae_parameters};
use loragate::model::text_encoder::{LayerChoice, TextConfig, TextEncoder};
use loragate::model::unet::{AddedConditioning, UNet, UNetConfig};
use loragate::model::vae::{Vae, VaeConfig};
use loragate::model::{Family, GenerationParams, Pipeline};
use loragate::model::clip::ClipModel;

fn ldm_unet_shapes(c: &UNetConfig) -> BTreeMap<String, Vec<usize>> {
    let shapes: BTreeMap<String, Vec<usize>> = unet_parameters(c).unwrap().into_iter().collect();
    unet_key_map(c).unwrap().into_iter().map(|(d, l)| (format!("model.diffusion_model.{l}"), shapes[&d].clone())).collect()
}

#[test]
fn unet_layouts_match_the_published_single_files() {
    // Names and shapes as they appear in v1-5-pruned.safetensors and
    // sd_xl_base_1.0.safetensors (LDM/SGM names).
    let sd15 = ldm_unet_shapes(&UNetConfig::sd15());
    assert_eq!(sd15.len(), 686, "SD 1.5's UNet has 686 tensors");
    for (k, s) in [
        ("model.diffusion_model.input_blocks.0.0.weight", vec![320, 4, 3, 3]),
        ("model.diffusion_model.input_blocks.1.1.proj_in.weight", vec![320, 320, 1, 1]),
        ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", vec![320, 768]),
        ("model.diffusion_model.input_blocks.3.0.op.weight", vec![320, 320, 3, 3]),
        ("model.diffusion_model.input_blocks.4.0.skip_connection.weight", vec![640, 320, 1, 1]),
        ("model.diffusion_model.input_blocks.11.0.emb_layers.1.weight", vec![1280, 1280]),
        ("model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight", vec![10240, 1280]),
        ("model.diffusion_model.output_blocks.2.1.conv.weight", vec![1280, 1280, 3, 3]),
        ("model.diffusion_model.output_blocks.5.2.conv.weight", vec![1280, 1280, 3, 3]),
        ("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_out.0.weight", vec![320, 320]),
        ("model.diffusion_model.time_embed.0.weight", vec![1280, 320]),
        ("model.diffusion_model.out.2.weight", vec![4, 320, 3, 3]),
    ] {
        assert_eq!(sd15.get(k), Some(&s), "{k}");
    }
    let sd2 = ldm_unet_shapes(&UNetConfig::sd2());
    assert_eq!(sd2.get("model.diffusion_model.input_blocks.1.1.proj_in.weight"), Some(&vec![320, 320]), "SD 2 projects linearly");
    assert_eq!(sd2.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"), Some(&vec![320, 1024]));
    let xl = ldm_unet_shapes(&UNetConfig::sdxl());
    assert_eq!(xl.len(), 1680, "SDXL's UNet has 1680 tensors");
    for (k, s) in [
        ("model.diffusion_model.label_emb.0.0.weight", vec![1280, 2816]),
        ("model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight", vec![640, 2048]),
        ("model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.2.weight", vec![1280, 5120]),
        ("model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight", vec![1280, 1280]),
        ("model.diffusion_model.output_blocks.2.2.conv.weight", vec![1280, 1280, 3, 3]),
        ("model.diffusion_model.output_blocks.8.0.out_layers.3.weight", vec![320, 320, 3, 3]),
    ] {
        assert_eq!(xl.get(k), Some(&s), "{k}");
    }
}

#[test]
fn vae_and_text_layouts_match_the_published_single_files() {
    let vae = VaeConfig::sd();
    let names: BTreeMap<String, Vec<usize>> = vae_parameters(&vae)
        .unwrap()
        .into_iter()
        .map(|(k, s)| (format!("first_stage_model.{}", vae_ldm_key(&k, &vae).unwrap()), s))
        .collect();
    assert_eq!(names.len(), 248, "the SD VAE has 248 tensors");
    for (k, s) in [
        ("first_stage_model.encoder.down.1.block.0.nin_shortcut.weight", vec![256, 128, 1, 1]),
        ("first_stage_model.encoder.down.0.downsample.conv.weight", vec![128, 128, 3, 3]),
        ("first_stage_model.encoder.norm_out.weight", vec![512]),
        ("first_stage_model.decoder.up.0.block.0.nin_shortcut.weight", vec![128, 256, 1, 1]),
        ("first_stage_model.decoder.up.3.upsample.conv.weight", vec![512, 512, 3, 3]),
        ("first_stage_model.decoder.mid.block_2.conv2.weight", vec![512, 512, 3, 3]),
        ("first_stage_model.quant_conv.weight", vec![8, 8, 1, 1]),
    ] {
        assert_eq!(names.get(k), Some(&s), "{k}");
    }
    // The mid attention's 1×1 convolutions load into linear layers.
    assert_eq!(names.get("first_stage_model.encoder.mid.attn_1.q.weight"), Some(&vec![512, 512]));
    let te: BTreeMap<String, Vec<usize>> = text_parameters(&TextConfig::sd15(), false).unwrap().into_iter().collect();
    assert_eq!(te.len(), 196, "CLIP ViT-L/14's text model has 196 tensors (without position ids)");
    assert_eq!(te.get("text_model.encoder.layers.11.mlp.fc2.weight"), Some(&vec![768, 3072]));
}

/// Random weights for a component built by `f` (uniform, fan-in scaled), on the CPU.
fn random<T>(seed: u64, f: impl FnOnce(&Params) -> loragate::Result<T>) -> (T, AdapterTargets) {
    let store = WeightStore::random(seed, DType::F32, &Device::Cpu);
    let targets = RefCell::new(AdapterTargets::default());
    let v = f(&Params::root(&store, &targets)).unwrap();
    (v, targets.into_inner())
}

fn finite(t: &Tensor) -> bool {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite())
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = loragate::model::noise::Rng::new(seed);
    loragate::model::noise::randn(&mut rng, shape, &Device::Cpu).unwrap()
}

/// One forward pass of each full-size family with random weights, at a size the CPU affords.
/// The families run one after another so at most one full UNet is in memory.
#[test]
fn full_size_families_load_and_run_with_random_weights() {
    let two_threads = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for (family, cfg, text_width, latent) in [
        ("SD 1.5", UNetConfig::sd15(), 768, 8),
        ("SD 2.x", UNetConfig::sd2(), 1024, 8),
        ("SDXL", UNetConfig::sdxl(), 2048, 8),
    ] {
        let (unet, targets) = random(1, |p| UNet::load(p, &cfg));
        let x = randn(&[2, 4, latent, latent], 2);
        let t = Tensor::new(&[999f32, 10.0], &Device::Cpu).unwrap();
        let ctx = randn(&[2, 77, text_width], 3);
        let added = cfg.is_sdxl_style().then(|| AddedConditioning {
            text_embeds: randn(&[2, 1280], 4),
            time_ids: Tensor::new(&[[1024f32, 1024., 0., 0., 1024., 1024.], [768., 1024., 0., 0., 1024., 1024.]], &Device::Cpu).unwrap(),
        });
        let out = unet.forward(&x, &t, &ctx, added.as_ref()).unwrap();
        assert_eq!(out.dims(), &[2, 4, latent, latent], "{family}");
        assert!(finite(&out), "{family}: non-finite output");
        // `predict` (inference) runs the two rows as two groups at once, each with its own rows
        // of every input, SDXL's added conditioning included.
        let grouped = two_threads.install(|| unet.predict(&x, &t, &ctx, added.as_ref())).unwrap();
        let d = (&out - &grouped).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let scale = out.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-5 * scale.max(1.0), "{family}: row groups differ by {d} (output up to {scale})");
        assert!(targets.len() > 100, "{family}: LoRA targets registered");
        if cfg.is_sdxl_style() {
            let err = unet.forward(&x, &t, &ctx, None).unwrap_err().to_string();
            assert!(err.contains("pooled text embeddings and time ids"), "{err}");
        }
        drop(unet);
    }
    // Text encoders: ViT-L/14 (SD 1.x, SDXL's first), OpenCLIP-H (SD 2.x), bigG (SDXL's second).
    for (name, cfg, proj, choice) in [
        ("ViT-L/14", TextConfig::sd15(), false, LayerChoice::LAST),
        ("OpenCLIP-H", TextConfig::sd2(), false, LayerChoice::LAST),
        ("OpenCLIP-bigG", TextConfig::sdxl_bigg(), true, LayerChoice::SDXL),
    ] {
        let (te, _) = random(5, |p| TextEncoder::load(p, &cfg, proj));
        let ids = Tensor::new(&[[49406u32, 320, 1929, 49407, 49407]], &Device::Cpu).unwrap();
        let enc = te.forward(&ids, choice).unwrap();
        assert_eq!(enc.hidden.dims(), &[1, 5, cfg.hidden_size], "{name}");
        assert_eq!(enc.pooled.dims()[1], if proj { cfg.projection_dim.unwrap() } else { cfg.hidden_size }, "{name}");
        assert!(finite(&enc.hidden), "{name}");
    }
    let (vae, _) = random(6, |p| Vae::load(p, &VaeConfig::sd()));
    let img = vae.decode(&randn(&[1, 4, 8, 8], 7)).unwrap();
    assert_eq!(img.dims(), &[1, 3, 64, 64]);
    assert_eq!(vae.encode(&img).unwrap().dims(), &[1, 4, 8, 8]);
}

#[test]
fn loras_are_refused_across_families_naming_both() {
    // The model side needs only the architecture: a recorder builds it without weights.
    let cfg = UNetConfig::sdxl();
    let store = WeightStore::recorder(&Device::Cpu);
    let t = RefCell::new(AdapterTargets::default());
    UNet::load(&Params::root(&store, &t), &cfg).unwrap();
    let mut targets = AdapterTargets::default();
    targets.extend_prefixed("unet", &t.into_inner());
    // An SD 1.5 LoRA: attn2.to_k reads 768-wide text; SDXL's reads 2048.
    let m = ExportModule {
        component: Component::Unet,
        path: "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k".into(),
        down: Tensor::zeros((4, 768), DType::F32, &Device::Cpu).unwrap(),
        up: Tensor::zeros((640, 4), DType::F32, &Device::Cpu).unwrap(),
        alpha: 4.0,
    };
    let bytes = loragate::tensors::serialize(&to_tensors(&[m], KeyStyle::Kohya).unwrap(), &BTreeMap::new(), loragate::tensors::SaveDtype::F32).unwrap();
    let lora = LoraFile::from_bytes(Path::new("sd15-style.safetensors"), &bytes).unwrap();
    let index = loragate::lora::apply::TargetIndex::new(&targets, Some(&cfg));
    let err = loragate::lora::apply::resolve_lora(&lora, &index, "sd_xl_base_1.0", Family::Sdxl).unwrap_err().to_string();
    assert!(err.contains("SD 1.x") && err.contains("SDXL"), "{err}");
    // SDXL kohya files name UNet modules the SGM way and use te1/te2.
    let m = ExportModule {
        component: Component::Unet,
        path: "input_blocks.4.1.transformer_blocks.1.attn2.to_k".into(),
        down: Tensor::zeros((4, 2048), DType::F32, &Device::Cpu).unwrap(),
        up: Tensor::zeros((640, 4), DType::F32, &Device::Cpu).unwrap(),
        alpha: 4.0,
    };
    let bytes = loragate::tensors::serialize(&to_tensors(&[m], KeyStyle::Kohya).unwrap(), &BTreeMap::new(), loragate::tensors::SaveDtype::F32).unwrap();
    let lora = LoraFile::from_bytes(Path::new("sdxl.safetensors"), &bytes).unwrap();
    let bound = loragate::lora::apply::resolve_lora(&lora, &index, "sd_xl_base_1.0", Family::Sdxl).unwrap();
    assert_eq!(bound.modules[0].target, "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k");
    // lora_te2_ means SDXL, whatever the widths.
    let mut t2 = BTreeMap::new();
    t2.insert("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight".to_string(), Tensor::zeros((4, 1280), DType::F32, &Device::Cpu).unwrap());
    t2.insert("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight".to_string(), Tensor::zeros((1280, 4), DType::F32, &Device::Cpu).unwrap());
    let bytes = loragate::tensors::serialize(&t2, &BTreeMap::new(), loragate::tensors::SaveDtype::F32).unwrap();
    let lora = LoraFile::from_bytes(Path::new("te2.safetensors"), &bytes).unwrap();
    assert_eq!(loragate::lora::apply::probable_family(&lora), Some(Family::Sdxl));
    let pipe = common::tiny();
    let err = LoraStack::resolve(&pipe, &[(&lora, 1.0)]).unwrap_err().to_string();
    assert!(err.contains("SDXL") && err.contains("tiny-sd"), "{err}");
}

fn generate(pipe: &Pipeline) -> Tensor {
    let params = GenerationParams { steps: 4, ..Default::default() };
    pipe.generate(&["yellow triangle, large, at the bottom, night background"], &[5], &params, &mut |_, _| {}).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loragate-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn tiny_sd_round_trips_through_an_a1111_single_file() {
    let folder = loragate::model::locate::assets_dir().unwrap().join("tiny-sd");
    let dir = tmp("single");
    let file = dir.join("tiny-sd.safetensors");
    loragate::model::single_file::write_from_folder(&folder, &file).unwrap();
    let (shapes, _) = loragate::model::single_file::read_header(&file).unwrap();
    assert!(shapes.contains_key("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"));
    assert!(shapes.contains_key("first_stage_model.decoder.up.0.block.0.conv1.weight"));
    assert!(shapes.contains_key("cond_stage_model.transformer.text_model.final_layer_norm.weight"));
    let from_folder = common::tiny();
    let location = loragate::model::locate::resolve_model(file.to_str().unwrap()).unwrap();
    assert!(location.single_file.is_some());
    let from_file = Pipeline::load(&location, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(from_file.targets().len(), from_folder.targets().len());
    let d = common::max_abs_diff(&generate(&from_file), &generate(&from_folder));
    assert_eq!(d, 0.0, "the single file must give the folder's images exactly");
}

#[test]
fn a_hugging_face_cache_tree_resolves_offline_and_missing_ids_say_how_to_get_them() {
    let folder = loragate::model::locate::assets_dir().unwrap().join("tiny-sd");
    let cache = tmp("hfcache");
    let repo = cache.join("models--loragate--tiny-sd");
    let snap = repo.join("snapshots").join("0123456789abcdef");
    copy_dir(&folder, &snap);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    let out = tmp("hfout");
    let run = |model: &str, png: &Path| {
        Command::new(env!("CARGO_BIN_EXE_loragate"))
            .args(["generate", "red circle, large, in the center, white background", "--model", model, "--steps", "3", "-o"])
            .arg(png)
            .env("HF_HUB_CACHE", &cache)
            .output()
            .unwrap()
    };
    let a = run("loragate/tiny-sd", &out.join("hub.png"));
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let b = run(folder.to_str().unwrap(), &out.join("folder.png"));
    assert!(b.status.success());
    let (ia, ib) = (image::open(out.join("hub.png")).unwrap().to_rgb8(), image::open(out.join("folder.png")).unwrap().to_rgb8());
    assert_eq!(ia.as_raw(), ib.as_raw(), "the cache snapshot gives the folder's image");
    let missing = run("stabilityai/stable-diffusion-xl-base-1.0", &out.join("x.png"));
    assert_eq!(missing.status.code(), Some(3));
    let msg = String::from_utf8_lossy(&missing.stderr);
    assert!(msg.contains("not in the Hugging Face cache") && msg.contains("huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0"), "{msg}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn clip_scorers_in_the_transformers_layout_embed_at_224() {
    // openai/clip-vit-base-patch32 and -large-patch14 configs (sizes as published).
    let b32 = r#"{"projection_dim": 512,
        "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "eos_token_id": 2},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu"}}"#;
    let l14 = r#"{"projection_dim": 768,
        "text_config": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "eos_token_id": 2},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu"}}"#;
    for (name, cfg, dim) in [("ViT-B/32", b32, 512), ("ViT-L/14", l14, 768)] {
        let scorer = ClipModel::with_random_weights(cfg, 1, &Device::Cpu).unwrap();
        assert_eq!(scorer.image_size(), 224);
        // A non-square image: shortest side to 224, centre crop.
        let img = image::RgbImage::from_fn(320, 240, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 90]));
        let t = loragate::imageio::images_to_tensor(std::slice::from_ref(&img), &Device::Cpu).unwrap();
        assert_eq!(scorer.preprocess(&t).unwrap().dims(), &[1, 3, 224, 224], "{name}");
        let ie = scorer.image_embeddings(&[img]).unwrap();
        let te = scorer.text_embeddings(&["a photo of a cat"]).unwrap();
        assert_eq!((ie.dims(), te.dims()), (&[1, dim][..], &[1, dim][..]), "{name}");
        let norm = ie.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((norm - 1.0).abs() < 1e-4, "{name}: embeddings are normalised");
    }
}

#[test]
fn vocab_json_and_merges_txt_tokenize_like_the_merge_list() {
    // Write CLIP's tokenizer in the SD-folder layout and check both readers agree.
    let gz = loragate::model::tokenizer::Tokenizer::openai_clip().unwrap();
    // The merge list compiled into the binary is the one in assets/clip.
    let file = loragate::model::tokenizer::Tokenizer::from_clip_bpe_gz(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/clip/bpe_simple_vocab_16e6.txt.gz")).unwrap();
    for text in ["a photo of a cat", "zorb, large, on the left"] {
        assert_eq!(file.tokens(text).0, gz.tokens(text).0, "{text}");
    }
    let dir = tmp("vocab");
    let (vocab, merges) = export_vocab(&gz);
    std::fs::write(dir.join("vocab.json"), vocab).unwrap();
    std::fs::write(dir.join("merges.txt"), merges).unwrap();
    std::fs::write(dir.join("special_tokens_map.json"), r#"{"pad_token": "!"}"#).unwrap();
    let folder = loragate::model::tokenizer::Tokenizer::from_dir(&dir).unwrap();
    for text in ["a photo of a cat", "white hair, red eyes, 1girl, holding a sword", "Zorb!! 123 $%"] {
        assert_eq!(folder.tokens(text).0, gz.tokens(text).0, "{text}");
    }
    assert_eq!(folder.pad, 0, "SD 2.x / SDXL pad with `!`");
}

/// vocab.json and merges.txt for the merge-list tokenizer (as CLIPTokenizer saves them).
fn export_vocab(t: &loragate::model::tokenizer::Tokenizer) -> (String, String) {
    let (vocab, merges) = t.export_vocab_and_merges();
    (serde_json::to_string(&vocab).unwrap(), format!("#version: 0.2\n{}\n", merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>().join("\n")))
}
