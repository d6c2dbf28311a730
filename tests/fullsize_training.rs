//! Full-size training proven against PEFT + diffusers: one LoRA training step of SD 1.5's and
//! SDXL's UNets (the published configs, random weights, batch 1, at the smallest size where the
//! mid block's self-attention sees more than one token: 128 px for SD 1.5, 64 px for SDXL) must
//! give the loss and the gradient of every LoRA matrix that tests/fixtures/fullsize/make.py got
//! from PyTorch. A second test trains a small SDXL-shaped model through the trainer's steps.
//!
//! The step is the trainer's own ([`step_loss`] and [`gradients`], which `loragate train` takes
//! every step through), with the network built by the trainer's [`Network`] on the layers its
//! target list selects. Covered: the UNet with live LoRA adapters, SDXL's added conditioning,
//! the DDPM forward process, the epsilon MSE and the backward pass. Not covered: the text
//! encoders (their hidden states and SDXL's pooled embedding are given as random tensors), the
//! VAE and the optimiser.
//!
//! Weights and inputs are not stored: both sides make them from the counter-based generator
//! make.py describes, so the fixture holds only the outputs (2 MB).

mod common;

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use loragate::model::adapters::AdapterTargets;
use loragate::model::params::{Params, WeightStore};
use loragate::model::scheduler::{NoiseSchedule, ScheduleConfig};
use loragate::model::unet::{AddedConditioning, UNet, UNetConfig};
use loragate::tensors::TensorFile;
use loragate::train::network::{Network, select_layers};
use loragate::train::r#loop::{StepBatch, gradients, sdxl_time_ids, step_loss};
use rayon::prelude::*;

/// FNV-1a, 64 bits, of a tensor's name.
fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Value `i` of tensor `name`, uniform in [-1, 1): splitmix64's mix of a per-name counter, top
/// 24 bits (make.py's `uniform`), then `u * scale (+ offset)` in f32 as make.py's `tensor`.
fn scaled(name: &str, n: usize, scale: f64, offset: f32) -> Vec<f32> {
    let (h, s) = (fnv1a(name), scale as f32);
    let mut out = vec![0f32; n];
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        for (k, v) in chunk.iter_mut().enumerate() {
            let i = ((c << 16) + k) as u64;
            let mut z = h.wrapping_add((i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let u = (z >> 40) as f32 * (1.0 / 8_388_608.0) - 1.0;
            // As make.py: only norm weights have an offset.
            *v = if offset != 0.0 { u * s + offset } else { u * s };
        }
    });
    out
}

fn uniform(name: &str, n: usize) -> Vec<f32> {
    scaled(name, n, 1.0, 0.0)
}

fn tensor(name: &str, shape: &[usize], scale: f64, offset: f32) -> Tensor {
    Tensor::from_vec(scaled(name, shape.iter().product(), scale, offset), shape, &Device::Cpu).unwrap()
}

/// A UNet parameter by its diffusers name (make.py's `weight`).
fn weight(name: &str, shape: &[usize]) -> Tensor {
    match shape {
        [_] if name.ends_with(".weight") => tensor(name, shape, 0.1, 1.0),
        [_] => tensor(name, shape, 0.1, 0.0),
        _ => tensor(name, shape, (3.0 / shape[1..].iter().product::<usize>() as f64).sqrt(), 0.0),
    }
}

/// The UNet of `cfg` with the generator's weights, and its LoRA targets under `unet.`.
fn hashed_unet(cfg: &UNetConfig) -> (UNet, AdapterTargets, usize) {
    let recorder = WeightStore::recorder(&Device::Cpu);
    UNet::load(&Params::root(&recorder, &RefCell::new(AdapterTargets::default())), cfg).unwrap();
    let names = recorder.recorded();
    let tensors: HashMap<String, Tensor> = names.iter().map(|(n, s)| (n.clone(), weight(n, s))).collect();
    let store = WeightStore::from_tensors("<make.py's generator>", tensors, DType::F32, &Device::Cpu);
    let t = RefCell::new(AdapterTargets::default());
    let unet = UNet::load(&Params::root(&store, &t), cfg).unwrap();
    let mut targets = AdapterTargets::default();
    targets.extend_prefixed("unet", &t.into_inner());
    (unet, targets, names.len())
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect()
}

/// The worst relative errors of one step against the fixture.
#[derive(Debug, Default)]
struct Errors {
    loss: f64,
    /// Per matrix: |norm − norm_ref| / norm_ref.
    norm: f64,
    /// Per matrix: |probe·g − probe·g_ref| / (norm_ref / √3), the typical size of a
    /// probe product (the probe's entries have variance 1/3).
    probe: f64,
    /// Whole gradients: ‖g − g_ref‖ / ‖g_ref‖.
    full: f64,
    /// Whole gradients: max |g − g_ref| / max |g_ref|.
    full_max: f64,
}

/// One training step of the architecture `arch` ("sd15" or "sdxl"), compared with the fixture.
fn step_against_fixture(arch: &str, cfg: &UNetConfig, published_tensors: usize) -> Errors {
    let dir = common::fixtures().join("fullsize");
    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{arch}.json"))).unwrap()).unwrap();
    let full = TensorFile::load(dir.join(format!("{arch}.safetensors")), DType::F32, &Device::Cpu).unwrap().tensors;
    let num = |k: &str| fx[k].as_f64().unwrap_or_else(|| panic!("{arch}.json has no {k}"));

    let t0 = std::time::Instant::now();
    let (unet, targets, weights) = hashed_unet(cfg);
    let t_weights = t0.elapsed().as_secs_f64();
    assert_eq!(weights, published_tensors, "{arch}: the UNet's parameter tensors");
    let (rank, alpha) = (fx["rank"].as_u64().unwrap() as usize, num("alpha"));
    let names: Vec<String> = fx["targets"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let layers = select_layers(&targets, &names).unwrap();
    let network = Network::new(&layers, rank, alpha, &mut loragate::model::noise::Rng::new(0), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(network.modules.len() as u64, fx["modules"].as_u64().unwrap(), "{arch}: PEFT adapted as many modules");
    // PEFT's B starts at zero, which would leave A without gradient: both are set non-zero.
    for m in &network.modules {
        let (d, u) = (m.down.as_tensor().dims().to_vec(), m.up.as_tensor().dims().to_vec());
        m.down.set(&tensor(&format!("{}.lora_A", m.path()), &d, (3.0 / d[1..].iter().product::<usize>() as f64).sqrt(), 0.0)).unwrap();
        m.up.set(&tensor(&format!("{}.lora_B", m.path()), &u, 0.1 * (3.0 / rank as f64).sqrt(), 0.0)).unwrap();
    }
    network.attach();

    let schedule = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
    let t = fx["timestep"].as_u64().unwrap() as usize;
    // diffusers accumulates ᾱ in f32, loragate in f64.
    let ac = schedule.alphas_cumprod[t];
    assert!((ac - num("alphas_cumprod_t")).abs() < 1e-6 * ac, "{arch}: ᾱ({t}) {ac} vs diffusers' {}", num("alphas_cumprod_t"));
    let latent = fx["latent"].as_u64().unwrap() as usize;
    let width = cfg.context_dim();
    let unit = 3f64.sqrt();
    let added = cfg.is_sdxl_style().then(|| {
        // The fixture's image: 80×96 (w×h) in a 64×64 bucket.
        let ids = sdxl_time_ids((80, 96), (64, 64));
        let want: Vec<f32> = fx["time_ids"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(ids.to_vec(), want, "{arch}: the trainer's size and crop ids");
        AddedConditioning {
            text_embeds: tensor("input.pooled", &[1, cfg.projection_class_embeddings_input_dim.unwrap() - 6 * cfg.addition_time_embed_dim.unwrap()], unit, 0.0),
            time_ids: Tensor::from_vec(ids.to_vec(), (1, 6), &Device::Cpu).unwrap(),
        }
    });
    let inputs = StepBatch {
        latents: tensor("input.latents", &[1, 4, latent, latent], unit, 0.0),
        noise: tensor("input.noise", &[1, 4, latent, latent], unit, 0.0),
        timesteps: vec![t],
        context: tensor("input.context", &[1, fx["context"].as_u64().unwrap() as usize, width], unit, 0.0),
        added,
    };
    let loss = step_loss(&unet, &schedule, &inputs).unwrap();
    let grads = gradients(&loss, &network.vars()).unwrap();
    eprintln!("{arch}: weights made in {t_weights:.1} s, one training step in {:.1} s", t0.elapsed().as_secs_f64() - t_weights);
    network.detach();
    drop(unet);

    let mut e = Errors { loss: (loss.to_scalar::<f32>().unwrap() as f64 - num("loss")).abs() / num("loss"), ..Default::default() };
    let reference = fx["grads"].as_object().unwrap();
    assert_eq!(reference.len(), 2 * network.modules.len(), "{arch}: matrices in the fixture");
    for (m, pair) in network.modules.iter().zip(grads.chunks(2)) {
        for (which, g) in [("lora_A", &pair[0]), ("lora_B", &pair[1])] {
            let name = format!("{}.{which}", m.path());
            let r = reference.get(&name).unwrap_or_else(|| panic!("{arch}: PEFT has no {name}"));
            let (dot_ref, norm_ref) = (r[0].as_f64().unwrap(), r[1].as_f64().unwrap());
            let g = values(g);
            let probe = uniform(&format!("probe.{name}"), g.len());
            let dot: f64 = g.iter().zip(&probe).map(|(a, b)| a * *b as f64).sum();
            assert!(norm_ref > 0.0, "{arch}: PEFT's gradient of {name} is zero");
            e.norm = e.norm.max((norm(&g) - norm_ref).abs() / norm_ref);
            e.probe = e.probe.max((dot - dot_ref).abs() / (norm_ref / unit));
            if let Some(want) = full.get(&name) {
                let want = values(want);
                assert_eq!(want.len(), g.len(), "{arch}: {name}");
                let diff: Vec<f64> = g.iter().zip(&want).map(|(a, b)| a - b).collect();
                let peak = want.iter().fold(0f64, |m, v| m.max(v.abs()));
                e.full = e.full.max(norm(&diff) / norm(&want));
                e.full_max = e.full_max.max(diff.iter().fold(0f64, |m, v| m.max(v.abs())) / peak);
            }
        }
    }
    let checked = network.modules.iter().filter(|m| full.contains_key(&format!("{}.lora_A", m.path()))).count();
    assert_eq!(checked * 2, full.len(), "{arch}: every whole gradient of the fixture was compared");
    e
}

/// The loss, and the gradients of the 2 × 182 (SD 1.5) and 2 × 658 (SDXL) LoRA matrices, of one
/// full-size training step agree with PEFT + diffusers to fp32 accumulation error (see
/// docs/training.md, "Full-size training, proven": the tolerances and the measured errors).
#[test]
fn full_size_training_steps_match_peft_and_diffusers() {
    // One full-size UNet at a time (SDXL's is 10 GB in f32).
    for (arch, cfg, published) in [("sd15", UNetConfig::sd15(), 686), ("sdxl", UNetConfig::sdxl(), 1680)] {
        let e = step_against_fixture(arch, &cfg, published);
        eprintln!("{arch}: {e:?}");
        assert!(e.loss < 1e-5, "{arch}: loss relative error {e:?}");
        assert!(e.norm < 5e-4 && e.probe < 5e-4, "{arch}: gradient fingerprints {e:?}");
        assert!(e.full < 5e-4 && e.full_max < 5e-4, "{arch}: whole gradients {e:?}");
    }
}

/// tiny-sd made SDXL-shaped: its text encoder twice (the second with a projection, whose output
/// is the pooled embedding), a small UNet that takes SDXL's added conditioning, random weights.
fn tiny_sdxl() -> loragate::model::Pipeline {
    use loragate::model::pipeline::parts_from_folder;
    let location = loragate::model::locate::resolve_model("tiny").unwrap();
    let mut parts = parts_from_folder(&location, DType::F32, &Device::Cpu).unwrap();
    let width = parts.text_config.hidden_size;
    let pooled = parts.text_config.projection_dim.unwrap();
    let mut te2 = parts.text_encoder.clone();
    te2.insert("text_projection.weight".into(), tensor("te2.text_projection", &[pooled, width], (3.0 / width as f64).sqrt(), 0.0));
    parts.second = Some((parts.text_config.clone(), te2, parts.tokenizer.clone()));
    let cfg: UNetConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1, "attention_head_dim": [2, 4], "cross_attention_dim": 2 * width,
        "use_linear_projection": true, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": pooled + 6 * 8
    }))
    .unwrap();
    let recorder = WeightStore::recorder(&Device::Cpu);
    UNet::load(&Params::root(&recorder, &RefCell::new(AdapterTargets::default())), &cfg).unwrap();
    parts.unet = recorder.recorded().iter().map(|(n, s)| (n.clone(), weight(n, s))).collect();
    parts.family = loragate::model::Family::from_unet(&cfg);
    parts.unet_config = cfg;
    loragate::model::Pipeline::from_parts(&location, parts, DType::F32, &Device::Cpu).unwrap()
}

/// SDXL LoRA training runs through the trainer's own steps: the pooled embeddings of the
/// captions and each sample's size and crop reach the UNet (which refuses to run without them).
#[test]
fn sdxl_loras_train_through_the_trainers_steps_with_pooled_embeddings_and_size_ids() {
    use loragate::progress::Progress;
    use loragate::train::config::Overrides;
    use loragate::train::dataset::{TrainImage, fit_to_bucket};
    use loragate::train::{TrainConfig, Trainer};
    let pipe = tiny_sdxl();
    assert_eq!(pipe.family, loragate::model::Family::Sdxl);
    let cfg = TrainConfig::from_overrides(&Overrides {
        dataset: Some("unused".into()),
        rank: Some(4),
        steps: Some(2),
        batch_size: Some(2),
        resolution: Some(vec![64]),
        targets: Some(["to_q", "to_k", "to_v", "to_out.0", "conv1"].iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    })
    .unwrap();
    let pixels: Vec<u8> = uniform("tiny-sdxl.image", 80 * 96 * 3).iter().map(|u| ((u + 1.0) * 127.5) as u8).collect();
    let tall = image::RgbImage::from_raw(80, 96, pixels).unwrap();
    let image = |img: &image::RgbImage, caption: &str| TrainImage {
        rel: format!("1_x/{caption}.png"),
        image: img.clone(),
        caption: caption.into(),
        repeats: 1,
        folder: "1_x".into(),
    };
    let images = vec![image(&tall, "zorb, large"), image(&tall, "zorb, small")];
    let mut trainer = Trainer::new(&pipe, cfg.clone(), images, &Progress::hidden()).unwrap();
    for _ in 0..cfg.steps {
        let s = trainer.train_step().unwrap();
        assert!(s.loss.is_finite() && s.grad_norm > 0.0, "{s:?}");
    }
    for m in &trainer.network.modules {
        let up = m.up.as_tensor().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(up > 0.0, "{} was not trained", m.key);
    }

    // The size ids reach the UNet: the same pixels, once as the 80×96 source (cut from a
    // 64×77 resize) and once as the 64×64 bucket itself, give the same latent but other
    // ids, so another loss at the same noise and timesteps.
    let cut = fit_to_bucket(&tall, (64, 64));
    let probe = |img: &image::RgbImage| {
        let mut t = Trainer::new(&pipe, cfg.clone(), vec![image(img, "zorb")], &Progress::hidden()).unwrap();
        t.probe_loss(1, 7).unwrap()
    };
    assert_eq!(sdxl_time_ids((80, 96), (64, 64)), [96.0, 80.0, 6.0, 0.0, 64.0, 64.0]);
    assert_eq!(sdxl_time_ids((64, 64), (64, 64)), [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]);
    let (from_source, from_cut) = (probe(&tall), probe(&cut));
    assert!((from_source - from_cut).abs() > 1e-6 * from_cut, "size ids changed nothing: {from_source} vs {from_cut}");
}
