//! The trainer's proof: gradients of every LoRA matrix by finite differences, a short run
//! whose loss falls and whose LoRA moves images toward the concept, export round trips in
//! both formats, the dataset check on a made-up folder, and config errors.

mod common;

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use loragate::imageio::{tensor_to_images, write_png};
use loragate::lora::{LoraFile, LoraStack};
use loragate::model::adapters::AdapterTargets;
use loragate::model::noise::{Rng, randn};
use loragate::model::params::{Params, WeightStore};
use loragate::model::unet::{UNet, UNetConfig};
use loragate::model::{GenerationParams, Pipeline};
use loragate::progress::Progress;
use loragate::train::check::{Problem, Severity};
use loragate::train::config::{OutputFormat, Overrides};
use loragate::train::network::{Network, select_layers};
use loragate::train::{TrainConfig, TrainOptions, Trainer, export, prepare};
use loragate::world::{Concept, DatasetSpec, RenderOptions};

/// A fresh, empty folder under the system temp dir, unique to this process and test.
fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loragate-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `count` shapes-world images with captions into `dir`.
fn world_dataset(dir: &Path, concept: Option<Concept>, count: usize, resolution: u32, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let spec = DatasetSpec { concept, count, seed, p_keep: 0.75, fixed_order: false, mislabel: None };
    let opts = RenderOptions { resolution, ..Default::default() };
    for s in spec.plan() {
        write_png(&dir.join(format!("{:04}.png", s.index)), &s.render(&opts), &[]).unwrap();
        std::fs::write(dir.join(format!("{:04}.txt", s.index)), &s.caption).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// (a) Gradients

/// A tiny random UNet with every kind of block: cross-attention down and up blocks, a plain
/// down and up block, the attention mid block; channels 8/16, 8×8 latents.
fn small_unet(dtype: DType) -> (UNet, AdapterTargets) {
    let cfg: UNetConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": [8, 16],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1, "attention_head_dim": 2, "cross_attention_dim": 12,
        "norm_num_groups": 4, "sample_size": 8
    }))
    .unwrap();
    let store = WeightStore::random(7, dtype, &Device::Cpu);
    let reg = RefCell::new(AdapterTargets::default());
    let unet = UNet::load(&Params::root(&store, &reg), &cfg).unwrap();
    let mut targets = AdapterTargets::default();
    targets.extend_prefixed("unet", &reg.into_inner());
    (unet, targets)
}

const GRAD_TARGETS: [&str; 8] = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "proj_in", "conv1", "conv_shortcut"];

/// Network over the small UNet with non-zero `up` matrices (with B = 0, A's gradient would
/// be zero and prove nothing).
fn grad_network(targets: &AdapterTargets, dtype: DType) -> Network {
    let names: Vec<String> = GRAD_TARGETS.iter().map(|s| s.to_string()).collect();
    let layers = select_layers(targets, &names).unwrap();
    let net = Network::new(&layers, 2, 3.0, &mut Rng::new(11), dtype, &Device::Cpu).unwrap();
    let mut rng = Rng::new(12);
    for m in &net.modules {
        let up = (randn(&mut rng, m.up.as_tensor().dims(), &Device::Cpu).unwrap() * 0.3).unwrap();
        m.up.set(&up.to_dtype(dtype).unwrap()).unwrap();
    }
    net.attach();
    net
}

struct Probe {
    x: Tensor,
    t: Tensor,
    ctx: Tensor,
    target: Tensor,
}

fn probe(dtype: DType) -> Probe {
    let mut rng = Rng::new(21);
    let cpu = &Device::Cpu;
    let x = randn(&mut rng, &[2, 4, 8, 8], cpu).unwrap().to_dtype(dtype).unwrap();
    let ctx = randn(&mut rng, &[2, 5, 12], cpu).unwrap().to_dtype(dtype).unwrap();
    let target = randn(&mut rng, &[2, 4, 8, 8], cpu).unwrap().to_dtype(dtype).unwrap();
    let t = Tensor::new(&[120f32, 730.0], cpu).unwrap();
    Probe { x, t, ctx, target }
}

fn loss(unet: &UNet, x: &Tensor, p: &Probe) -> Tensor {
    let pred = unet.forward(x, &p.t, &p.ctx, None).unwrap();
    (pred - &p.target).unwrap().sqr().unwrap().mean_all().unwrap()
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b).unwrap().sum_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn norm(a: &Tensor) -> f64 {
    dot(a, a).sqrt()
}

/// Central differences in f64 along a random direction of every down and up matrix (and
/// along single entries of some), against autograd; then the f32 training path (fused
/// kernels where nothing is tracked, the frozen-kernel convolution) against the f64 gradients.
#[test]
fn finite_differences_prove_the_gradient_of_every_lora_matrix() {
    let (unet, targets) = small_unet(DType::F64);
    let net = grad_network(&targets, DType::F64);
    let kinds: std::collections::BTreeSet<&str> =
        net.modules.iter().map(|m| GRAD_TARGETS.iter().find(|t| m.path().ends_with(*t)).copied().unwrap()).collect();
    assert_eq!(kinds.len(), GRAD_TARGETS.len(), "every target kind is present: {kinds:?}");
    assert!(net.modules.iter().any(|m| m.path().contains("attn2.to_k")), "cross-attention keys are trained");
    let p = probe(DType::F64);
    // A variable input keeps every op on its composite, differentiable (f64-capable) path.
    let xv = Var::from_tensor(&p.x).unwrap();
    let l = loss(&unet, xv.as_tensor(), &p);
    let grads = l.backward().unwrap();
    let eval = || loss(&unet, xv.as_tensor(), &p).to_scalar::<f64>().unwrap();
    let eps = 1e-5;
    let mut rng = Rng::new(31);
    let mut checked = 0;
    let mut worst = 0f64;
    for m in &net.modules {
        for (which, var) in [("down", &m.down), ("up", &m.up)] {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{} {which}: no gradient", m.key));
            assert!(norm(g) > 1e-12, "{} {which}: zero gradient", m.key);
            let theta = var.as_tensor().copy().unwrap();
            let d = randn(&mut rng, theta.dims(), &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
            var.set(&(&theta + (&d * eps).unwrap()).unwrap()).unwrap();
            let lp = eval();
            var.set(&(&theta - (&d * eps).unwrap()).unwrap()).unwrap();
            let lm = eval();
            var.set(&theta).unwrap();
            let fd = (lp - lm) / (2.0 * eps);
            let ad = dot(g, &d);
            let rel = (fd - ad).abs() / ad.abs().max(1e-8);
            worst = worst.max(rel);
            // Relative, with an absolute floor for directions the loss barely depends on
            // (there f64 round-off, ~1e-16 / ε, dominates).
            assert!((fd - ad).abs() <= 1e-5 * ad.abs() + 1e-10, "{} {which}: finite difference {fd:e} vs autograd {ad:e} (relative error {rel:e})", m.key);
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * net.modules.len());
    // Single entries of the query and key matrices of the first self-attention.
    for name in ["attn1.to_q", "attn1.to_k", "attn2.to_k"] {
        let m = net.modules.iter().find(|m| m.path().ends_with(name)).unwrap();
        for var in [&m.down, &m.up] {
            let theta = var.as_tensor().copy().unwrap();
            let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let mut flat = theta.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for idx in [0, flat.len() / 2, flat.len() - 1] {
                let orig = flat[idx];
                flat[idx] = orig + eps;
                var.set(&Tensor::from_vec(flat.clone(), theta.dims(), &Device::Cpu).unwrap()).unwrap();
                let lp = eval();
                flat[idx] = orig - eps;
                var.set(&Tensor::from_vec(flat.clone(), theta.dims(), &Device::Cpu).unwrap()).unwrap();
                let lm = eval();
                flat[idx] = orig;
                var.set(&theta).unwrap();
                let fd = (lp - lm) / (2.0 * eps);
                assert!((fd - g[idx]).abs() <= 1e-4 * g[idx].abs() + 1e-9, "{name} entry {idx}: {fd:e} vs {:e}", g[idx]);
            }
        }
    }
    eprintln!("{checked} matrices, worst relative error {worst:e}");

    // The f32 path the trainer runs, against the proven f64 gradients.
    let (unet32, targets32) = small_unet(DType::F32);
    let net32 = grad_network(&targets32, DType::F32);
    for (a, b) in net32.vars().iter().zip(net.vars()) {
        a.set(&b.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
    }
    let p32 = probe(DType::F32);
    let g32 = loss(&unet32, &p32.x, &p32).backward().unwrap();
    for (m32, m64) in net32.modules.iter().zip(&net.modules) {
        for (v32, v64) in [(&m32.down, &m64.down), (&m32.up, &m64.up)] {
            let a = g32.get(v32.as_tensor()).unwrap_or_else(|| panic!("{}: no f32 gradient", m32.key)).to_dtype(DType::F64).unwrap();
            let b = grads.get(v64.as_tensor()).unwrap();
            let rel = norm(&(&a - b).unwrap()) / norm(b);
            assert!(rel < 1e-3, "{}: f32 gradient differs from f64 by {rel:e}", m32.key);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (b) A short training run

/// For each generated image, its tiny-clip cosine with the nearest training image; averaged.
fn mean_similarity(scorer: &loragate::model::clip::ClipModel, images: &[image::RgbImage], train: &Tensor) -> f64 {
    let e = scorer.image_embeddings(images).unwrap();
    let m = loragate::model::clip::cosine_matrix(&e, train).unwrap();
    m.iter().map(|row| row.iter().cloned().fold(f64::MIN, f64::max)).sum::<f64>() / m.len() as f64
}

/// A short run at 128 px teaching a new word a look: 6 images of a large blue square on a
/// white background, captioned with the made-up trigger `zorb` alone. The probe loss falls, and
/// images generated for "zorb" with the exported LoRA (loaded and merged as the harness does)
/// look more like the training images to tiny-clip than the base model's do. (Teaching the
/// world's zorb *shape* needs a long run; this test is about the machinery moving generation
/// toward the data within a test's budget.)
#[test]
fn a_short_run_lowers_the_loss_and_moves_images_toward_the_concept() {
    let dir = temp("short-run");
    let data = dir.join("data");
    let concept = data.join("20_zorb");
    std::fs::create_dir_all(&concept).unwrap();
    for i in 0..6u64 {
        let (_, img) = loragate::world::render_prompt("blue square, large, in the center, white background", i, &RenderOptions::default()).unwrap();
        write_png(&concept.join(format!("{i:04}.png")), &img, &[]).unwrap();
        std::fs::write(concept.join(format!("{i:04}.txt")), "zorb").unwrap();
    }
    let cfg = TrainConfig::from_overrides(&Overrides {
        dataset: Some(data.clone()),
        output_dir: Some(dir.join("out")),
        rank: Some(8),
        steps: Some(40),
        batch_size: Some(2),
        learning_rate: Some(5e-3),
        resolution: Some(vec![128]),
        targets: Some(["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "proj_in", "proj_out"].iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    })
    .unwrap();
    let (cfg, location, check) = prepare(&cfg).unwrap();
    assert_eq!(check.errors(), 0, "{}", check.table());
    assert_eq!(check.samples_per_epoch(), 6 * 20, "the 20_ folder repeats each image 20 times");
    let pipe = Pipeline::load(&location, DType::F32, &Device::Cpu).unwrap();
    let images: Vec<image::RgbImage> = check.images.iter().map(|i| i.image.clone()).collect();
    let prompts: Vec<String> = vec!["zorb".to_string(); 6];
    let prompt_refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let seeds: Vec<u64> = (0..prompts.len() as u64).collect();
    let params = GenerationParams { steps: 12, ..Default::default() };
    let base = tensor_to_images(&pipe.generate(&prompt_refs, &seeds, &params, &mut |_, _| {}).unwrap()).unwrap();

    let mut trainer = Trainer::new(&pipe, cfg.clone(), check.images.clone(), &Progress::hidden()).unwrap();
    let before = trainer.probe_loss(16, 5).unwrap();
    let t0 = std::time::Instant::now();
    let mut losses = Vec::new();
    for _ in 0..cfg.steps {
        losses.push(trainer.train_step().unwrap().loss);
    }
    let secs = t0.elapsed().as_secs_f64();
    let after = trainer.probe_loss(16, 5).unwrap();
    eprintln!("probe loss {before:.4} → {after:.4}; {:.2} steps/s at 128 px batch 2", cfg.steps as f64 / secs);
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(after < before * 0.9, "probe loss did not fall: {before} → {after}");

    // Export, then load and merge as the harness does.
    let path = dir.join("zorb.safetensors");
    let facts = export::RunFacts {
        model: "tiny".into(),
        family: pipe.family,
        prediction: pipe.schedule.prediction,
        images: 6,
        samples_per_epoch: check.samples_per_epoch(),
        dataset_hash: check.hash.clone(),
        folders: Default::default(),
        tag_frequency: Default::default(),
        started_at: 0,
    };
    export::save(&path, &cfg, &trainer.network, &export::metadata(&cfg, &facts, &trainer.network, cfg.steps)).unwrap();
    trainer.network.detach();
    let file = LoraFile::load(&path).unwrap();
    LoraStack::resolve(&pipe, &[(&file, 1.0)]).unwrap().apply(&pipe).unwrap();
    let tuned = tensor_to_images(&pipe.generate(&prompt_refs, &seeds, &params, &mut |_, _| {}).unwrap()).unwrap();
    pipe.targets().clear().unwrap();

    // LORAGATE_TEST_DUMP=DIR writes base, LoRA and training images as one grid, for a look.
    if let Ok(d) = std::env::var("LORAGATE_TEST_DUMP") {
        let all: Vec<image::RgbImage> = base.iter().chain(&tuned).chain(&images[..6]).cloned().collect();
        write_png(&Path::new(&d).join("short-run.png"), &loragate::imageio::grid(&all, 6).unwrap(), &[]).unwrap();
    }
    let scorer = loragate::model::clip::ClipModel::load(&loragate::model::locate::resolve_scorer("tiny-clip").unwrap(), &Device::Cpu).unwrap();
    let train_emb = scorer.image_embeddings(&images).unwrap();
    let s_base = mean_similarity(&scorer, &base, &train_emb);
    let s_tuned = mean_similarity(&scorer, &tuned, &train_emb);
    eprintln!("tiny-clip image similarity to the training images: base {s_base:.4}, with the LoRA {s_tuned:.4}");
    assert!(s_tuned > s_base + 0.1, "base {s_base:.4} vs LoRA {s_tuned:.4}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// (c) Export round trips

/// Live adapters (as trained) and the exported file merged by the harness give the same UNet
/// output, in kohya and diffusers format, for linear and convolution targets.
#[test]
fn exported_loras_load_in_the_harness_and_match_the_training_forward() {
    let pipe = common::tiny();
    let dir = temp("export");
    let targets: Vec<String> = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "proj_in", "conv1", "downsamplers.0.conv"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let layers = select_layers(pipe.targets(), &targets).unwrap();
    let net = Network::new(&layers, 4, 2.0, &mut Rng::new(1), DType::F32, &Device::Cpu).unwrap();
    let mut rng = Rng::new(2);
    for m in &net.modules {
        let up = (randn(&mut rng, m.up.as_tensor().dims(), &Device::Cpu).unwrap() * 0.05).unwrap();
        m.up.set(&up).unwrap();
    }
    let mut rng = Rng::new(3);
    let x = randn(&mut rng, &[2, 4, 16, 16], &Device::Cpu).unwrap();
    let t = Tensor::new(&[250f32, 800.0], &Device::Cpu).unwrap();
    let ctx = pipe.encode_prompts(&["zorb, large, sky background", "red circle"], 1).unwrap().context;
    let base = pipe.unet.forward(&x, &t, &ctx, None).unwrap();
    net.attach();
    let live = pipe.unet.forward(&x, &t, &ctx, None).unwrap();
    net.detach();
    assert!(common::max_abs_diff(&live, &base) > 1e-3, "the adapters change the output");

    for format in ["kohya", "diffusers"] {
        let cfg = TrainConfig::from_overrides(&Overrides {
            dataset: Some(dir.clone()),
            format: Some(format.into()),
            rank: Some(4),
            alpha: Some(2.0),
            targets: Some(targets.clone()),
            resolution: Some(vec![128]),
            ..Default::default()
        })
        .unwrap();
        let facts = export::RunFacts {
            model: "tiny".into(),
            family: pipe.family,
            prediction: pipe.schedule.prediction,
            images: 3,
            samples_per_epoch: 30,
            dataset_hash: "abc123".into(),
            folders: [("10_zorb".to_string(), (10, 3))].into_iter().collect(),
            tag_frequency: Default::default(),
            started_at: 1_767_225_599,
        };
        let path = dir.join(format!("rt.{format}.safetensors"));
        export::save(&path, &cfg, &net, &export::metadata(&cfg, &facts, &net, 7)).unwrap();
        let file = LoraFile::load(&path).unwrap();
        let expected = if cfg.format == OutputFormat::Kohya { loragate::lora::LoraFormat::Kohya } else { loragate::lora::LoraFormat::Diffusers };
        assert_eq!(file.format, expected);
        assert_eq!(file.modules.len(), net.modules.len());
        assert!(file.modules.iter().all(|m| m.alpha == Some(2.0) && m.rank() == Some(4)));
        let meta = &file.metadata;
        for (k, v) in [
            ("ss_network_module", "networks.lora"),
            ("ss_network_dim", "4"),
            ("ss_network_alpha", "2"),
            ("ss_base_model_version", "sd_layout_text192"),
            ("ss_resolution", "(128, 128)"),
            ("ss_num_train_images", "30"),
            ("ss_output_name", cfg.name.as_str()),
            ("ss_steps", "7"),
            ("modelspec.sai_model_spec", "1.0.0"),
            ("modelspec.architecture", "sd-layout-text192/lora"),
            ("modelspec.resolution", "128x128"),
            ("modelspec.date", "2025-12-31T23:59:59+00:00"),
            ("loragate.dataset_hash", "abc123"),
        ] {
            assert_eq!(meta.get(k).map(String::as_str), Some(v), "{format}: metadata {k}");
        }
        let stored: serde_json::Value = serde_json::from_str(&meta["loragate.training_config"]).unwrap();
        assert_eq!(stored["rank"], 4);
        assert_eq!(stored["targets"].as_array().unwrap().len(), targets.len());
        assert_eq!(meta["ss_dataset_dirs"], r#"{"10_zorb":{"img_count":3,"n_repeats":10}}"#);

        let stack = LoraStack::resolve(&pipe, &[(&file, 1.0)]).unwrap();
        stack.apply(&pipe).unwrap();
        let merged = pipe.unet.forward(&x, &t, &ctx, None).unwrap();
        pipe.targets().clear().unwrap();
        let d = common::max_abs_diff(&merged, &live);
        assert!(d < 1e-4, "{format}: merged output differs from the live adapters by {d}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// (d) The dataset check

#[test]
fn the_dataset_check_finds_what_is_wrong_with_a_folder() {
    let dir = temp("check");
    let good = dir.join("5_zorb");
    world_dataset(&good, Some(Concept::Zorb), 4, 128, 9);
    // Unreadable: not an image at all.
    std::fs::write(good.join("broken.png"), b"this is not a png").unwrap();
    std::fs::write(good.join("broken.txt"), "zorb").unwrap();
    // Missing caption.
    let img = image::open(good.join("0000.png")).unwrap().to_rgb8();
    write_png(&good.join("uncaptioned.png"), &loragate::world::render_prompt("red circle, large", 1, &RenderOptions::default()).unwrap().1, &[]).unwrap();
    // Too small.
    let small = image::imageops::resize(&img, 48, 48, image::imageops::FilterType::Triangle);
    write_png(&good.join("tiny.png"), &small, &[]).unwrap();
    std::fs::write(good.join("tiny.txt"), "zorb, small").unwrap();
    // Near-duplicate: a re-encoded JPEG of image 0.
    image::DynamicImage::ImageRgb8(img.clone()).save_with_format(good.join("copy.jpg"), image::ImageFormat::Jpeg).unwrap();
    std::fs::write(good.join("copy.txt"), "zorb").unwrap();
    // A caption without an image, and a folder that is not a repeat folder.
    std::fs::write(good.join("lonely.txt"), "zorb").unwrap();
    std::fs::create_dir_all(dir.join("notes")).unwrap();
    std::fs::write(dir.join("notes").join("a.png"), b"x").unwrap();

    let cfg = TrainConfig::from_overrides(&Overrides { dataset: Some(dir.clone()), ..Default::default() }).unwrap();
    let (_, _, check) = prepare(&cfg).unwrap();
    let find = |p: Problem| check.findings.iter().filter(|f| f.problem == p).collect::<Vec<_>>();
    let table = check.table();
    eprintln!("{table}");
    let unreadable = find(Problem::Unreadable);
    assert_eq!(unreadable.len(), 1, "{table}");
    assert_eq!(unreadable[0].file, "5_zorb/broken.png");
    assert_eq!(unreadable[0].severity, Severity::Error);
    let missing = find(Problem::MissingCaption);
    assert_eq!(missing.len(), 1);
    assert_eq!((missing[0].file.as_str(), missing[0].severity), ("5_zorb/uncaptioned.png", Severity::Error));
    let small = find(Problem::TooSmall);
    assert_eq!(small.len(), 1);
    assert_eq!((small[0].file.as_str(), small[0].severity), ("5_zorb/tiny.png", Severity::Warning));
    assert!(small[0].detail.contains("48x48"), "{}", small[0].detail);
    let dups = find(Problem::NearDuplicate);
    assert!(dups.iter().any(|d| d.file == "5_zorb/copy.jpg" && d.detail.contains("5_zorb/0000.png")), "{table}");
    assert!(dups.iter().all(|d| d.severity == Severity::Warning));
    assert_eq!(find(Problem::OrphanCaption).len(), 1);
    assert_eq!(find(Problem::IgnoredFolder)[0].file, "notes");
    assert_eq!(check.errors(), 2);
    // The usable images: 4 renders, the small one and the copy; 5 repeats each.
    assert_eq!(check.images.len(), 6);
    assert_eq!(check.samples_per_epoch(), 30);
    for word in ["unreadable", "missing caption", "too small", "near-duplicate", "2 errors"] {
        assert!(table.contains(word), "table lacks {word}:\n{table}");
    }
    // Errors stop training before any model work.
    let e = loragate::train::run(&cfg, &TrainOptions::cpu(), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("2 error(s)"), "{e}");
    // `--check` through the binary: the table, exit code 2.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loragate"))
        .args(["train", "--check", "--dataset"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("5_zorb/broken.png"));
    // A default caption turns the missing caption into a warning.
    let cfg2 = TrainConfig::parse(&dir.join("t.yaml"), "dataset: .\ndefault_caption: shape\n", &Overrides::default()).unwrap();
    let (_, _, check2) = prepare(&cfg2).unwrap();
    assert_eq!(check2.errors(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// (e) Config errors

#[test]
fn bad_configs_are_located_errors() {
    let f = Path::new("configs/zorb.yaml");
    let err = |text: &str| TrainConfig::parse(f, text, &Overrides::default()).unwrap_err().to_string();
    let e = err("dataset: d\nrnak: 8\n");
    assert!(e.starts_with("configs/zorb.yaml:2:1: unknown field `rnak`"), "{e}");
    assert!(e.contains("hint:"), "{e}");
    let e = err("dataset: d\nrank: 0\n");
    assert!(e.starts_with("configs/zorb.yaml:2:7: rank: must be between 1 and 1024"), "{e}");
    let e = err("dataset: d\nrank: eight\n");
    assert!(e.starts_with("configs/zorb.yaml:2:"), "{e}");
    let e = err("dataset: d\ntag_dropout: 1.5\n");
    assert!(e.starts_with("configs/zorb.yaml:2:14: tag_dropout: is a probability"), "{e}");
    let e = err("dataset: d\nlearning_rate: -1e-4\n");
    assert!(e.contains(":2:16: learning_rate: must be a positive number"), "{e}");
    let e = err("dataset: d\nformat: ckpt\n");
    assert!(e.contains(":2:9: format: unknown format `ckpt`") && e.contains("kohya or diffusers"), "{e}");
    let e = err("dataset: d\ntargets: [to_q, '']\n");
    assert!(e.contains("targets: `` is not a layer name suffix"), "{e}");
    let e = err("dataset: d\nsteps: 10\nwarmup_steps: 10\n");
    assert!(e.contains(":3:15: warmup_steps"), "{e}");
    let e = err("dataset: d\nname: ../evil\n");
    assert!(e.contains(":2:7: name:"), "{e}");
    let e = err("rank: 4\n");
    assert!(e.contains("no dataset folder given"), "{e}");
    let e = err("dataset: d\nvalidation_every: 10\n");
    assert!(e.contains("no validation suite"), "{e}");
    // Held-out split, pick and early stopping.
    let e = err("dataset: d\nvalidation_split: 1.0\n");
    assert!(e.starts_with("configs/zorb.yaml:2:19: validation_split: 1 is not a fraction between 0 and 1"), "{e}");
    let e = err("dataset: d\nvalidation_split: 0\n");
    assert!(e.contains(":2:19: validation_split: 0 is not a fraction") && e.contains("hint:"), "{e}");
    let e = err("dataset: d\nvalidation_split: no/such/folder\n");
    assert!(e.contains(":2:19: validation_split: folder configs/no/such/folder does not exist"), "{e}");
    let e = err("dataset: d\npick: newest\n");
    assert!(e.contains(":2:7: pick: unknown rule `newest`") && e.contains("best or latest-passing"), "{e}");
    let e = err("dataset: d\nvalidation_split: 0.1\nearly_stop: { patience: 0 }\n");
    assert!(e.contains(":3:25: early_stop.patience: must be at least 1"), "{e}");
    let e = err("dataset: d\ncheckpoint_every: 10\nearly_stop: { patience: 2 }\n");
    assert!(e.contains("early_stop: has nothing to watch"), "{e}");
    let e = err("dataset: d\nvalidation_split: 0.1\nearly_stop: { patience: 2 }\n");
    assert!(e.contains("early_stop: needs checkpoints"), "{e}");
    let e = err("dataset: d\nearly_stop: { patience: 2, min_delta: 0.1 }\n");
    assert!(e.contains("unknown field `min_delta`"), "{e}");
    let o = Overrides { dataset: Some("d".into()), pick: Some("worst".into()), ..Default::default() };
    assert!(TrainConfig::from_overrides(&o).unwrap_err().to_string().starts_with("--pick: unknown rule `worst`"));
    // A split that leaves either side empty is refused before any model loads.
    let tiny = temp("tiny-split");
    world_dataset(&tiny, None, 3, 64, 2);
    let cfg = TrainConfig::from_overrides(&Overrides {
        dataset: Some(tiny.clone()),
        validation_split: Some("0.1".into()),
        resolution: Some(vec![64]),
        output_dir: Some(tiny.join("out")),
        ..Default::default()
    })
    .unwrap();
    let e = loragate::train::run(&cfg, &TrainOptions::cpu(), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("validation_split 0.1 of 3 image(s) holds out none") && e.contains(&tiny.display().to_string()), "{e}");
    let _ = std::fs::remove_dir_all(&tiny);
    // Flags are named in their errors.
    let o = Overrides { dataset: Some("d".into()), rank: Some(0), ..Default::default() };
    let e = TrainConfig::from_overrides(&o).unwrap_err().to_string();
    assert!(e.starts_with("--rank: must be between 1 and 1024"), "{e}");
    // A target that names no layer is refused before training, with the names that exist.
    let dir = temp("bad-target");
    world_dataset(&dir, None, 2, 64, 1);
    let cfg = TrainConfig::from_overrides(&Overrides {
        dataset: Some(dir.clone()),
        targets: Some(vec!["to_qq".into()]),
        resolution: Some(vec![64]),
        output_dir: Some(dir.join("out")),
        ..Default::default()
    })
    .unwrap();
    let e = loragate::train::run(&cfg, &TrainOptions::cpu(), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("target `to_qq` names no layer") && e.contains("to_out.0"), "{e}");
    // Through the binary: exit code 2 and the located message.
    std::fs::write(dir.join("bad.yaml"), "dataset: .\nbatch_size: 0\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loragate")).args(["train"]).arg(dir.join("bad.yaml")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.yaml:2:13: batch_size: must be between 1 and 256"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// The whole loop: train → checkpoints → validation suite → verdict table and JUnit

#[test]
fn checkpoints_are_validated_by_a_suite_and_the_best_is_named() {
    let dir = temp("validate");
    let data = dir.join("data");
    world_dataset(&data, Some(Concept::Zorb), 8, 64, 4);
    let lora = common::shared_loras().join("zorb.kohya.safetensors");
    let suite = format!(
        "name: train-check\nloras:\n  - name: zorb\n    file: {}\n    trigger: zorb\n    class_word: ring\n\
         defaults:\n  seeds: [0]\n  steps: 6\n  size: 64x64\n\
         cases:\n  - name: zorb-sky\n    prompt: zorb, large, sky background\n    adapters: [zorb]\n    thresholds:\n      clip_floor: -1\n      control_drop: 2\n      leak: 0.07\n      blank: 0\n      per_seed: false\n",
        lora.display()
    );
    std::fs::write(dir.join("suite.yaml"), suite).unwrap();
    // Held-out images in a folder of their own (the training set stays the 8 images).
    world_dataset(&dir.join("held"), Some(Concept::Zorb), 2, 64, 40);
    let cfg_text = "dataset: data\noutput_dir: out\nsteps: 4\nbatch_size: 2\nresolution: 64\nrank: 4\nlearning_rate: 1e-2\nlr_schedule: constant\nwarmup_steps: 0\n\
                    checkpoint_every: 2\nvalidation_suite: suite.yaml\nvalidation_every: 2\nformat: diffusers\nvalidation_split: held\n";
    std::fs::write(dir.join("train.yaml"), cfg_text).unwrap();
    let cfg = TrainConfig::load(&dir.join("train.yaml"), &Overrides::default()).unwrap();
    let mut lines = Vec::new();
    let outcome = loragate::train::run(&cfg, &TrainOptions::cpu(), &mut |l| lines.push(l.to_string())).unwrap();
    let text = lines.join("\n");
    eprintln!("{text}");
    assert_eq!(outcome.checkpoints.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![2, 4]);
    assert!(outcome.checkpoints.iter().all(|(_, p)| p.is_file()));
    assert!(dir.join("out").join("data.safetensors").is_file());
    assert_eq!(outcome.verdicts.len(), 2);
    assert!(outcome.verdicts.iter().all(|v| v.passed > 0), "{text}");
    // At a constant lr of 1e-2 the LoRA changes images by about 0.02 (mean abs) after two steps
    // and 0.2 after four: the `leak` limit of 0.07 passes the first checkpoint and fails the last.
    assert_eq!(outcome.verdicts[0].failed, 0, "{text}");
    assert!(outcome.verdicts[1].failed > 0 && outcome.verdicts[1].failures.iter().any(|f| f.contains("zorb-sky::leak")), "{text}");
    assert!(text.contains("step 2") && text.contains("step 4"), "{text}");
    let junit = std::fs::read_to_string(outcome.junit.as_ref().unwrap()).unwrap();
    assert!(junit.contains("train-check@step2") && junit.contains("train-check@step4"), "{junit}");
    // The chosen checkpoint is the one that passes, not the last one.
    assert_eq!(outcome.best, Some(2), "{text}");
    assert!(text.contains(&format!("chosen checkpoint: step 2 → {}", dir.join("out").join("data.safetensors").display())), "{text}");
    assert!(outcome.choice.reason.contains("passes every check (1 of 2 checkpoints do)"), "{}", outcome.choice.reason);
    // <name>.safetensors is the step-2 checkpoint (same tensors) with the reason added.
    let chosen = LoraFile::load(&outcome.final_path).unwrap();
    let step2 = LoraFile::load(&dir.join("out").join("data-step2.safetensors")).unwrap();
    assert_eq!(chosen.metadata["loragate.step"], "2");
    assert_eq!(chosen.metadata["loragate.pick_reason"], outcome.choice.reason);
    assert_eq!(chosen.metadata["loragate.heldout_loss"], step2.metadata["loragate.heldout_loss"]);
    let (a, b) = (std::fs::read(&outcome.final_path).unwrap(), std::fs::read(dir.join("out").join("data-step2.safetensors")).unwrap());
    let (a, b) = (safetensors::SafeTensors::deserialize(&a).unwrap(), safetensors::SafeTensors::deserialize(&b).unwrap());
    assert_eq!(a.len(), b.len());
    for (name, t) in b.tensors() {
        assert_eq!(a.tensor(&name).unwrap().data(), t.data(), "{name}");
    }
    // Held-out loss: in the table, the CSV and each checkpoint's metadata.
    assert_eq!(outcome.heldout_images, vec!["0000.png".to_string(), "0001.png".to_string()]);
    let held: Vec<f64> = outcome.evaluations.iter().map(|e| e.heldout.unwrap()).collect();
    assert_eq!(held.len(), 2);
    assert!(text.contains(&format!("{:.4}", held[1])) && text.contains("← chosen"), "{text}");
    let csv = std::fs::read_to_string(&outcome.log).unwrap();
    assert_eq!(csv.lines().count(), 5);
    assert!(csv.lines().nth(4).unwrap().ends_with(&format!(",{:.6}", held[1])), "{csv}");
    assert!(csv.lines().nth(1).unwrap().ends_with(','), "no held-out loss between checkpoints: {csv}");
    // The report: charts drawn by plotters, one thumbnail per checkpoint, the pick and why.
    let html = std::fs::read_to_string(&outcome.report).unwrap();
    assert!(html.matches("<svg").count() >= 4, "training loss, held-out loss, CLIP, checks");
    for title in ["Training loss", "Held-out loss", "CLIP mean", "Checks passed and failed"] {
        assert!(html.contains(title), "no {title} chart");
    }
    assert!(html.contains("<polyline") && html.contains("<circle"), "plotters' lines and dots");
    assert_eq!(html.matches("<figure class=\"thumb").count(), 2, "one thumbnail per checkpoint");
    assert!(html.contains("zorb, large, sky background"), "the thumbnails' prompt");
    assert!(html.contains("<b>Chosen: step 2</b>") && html.contains(&outcome.choice.reason), "the pick and its reason");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `validation_split` holds images out: the trainer's images and every batch it draws are
/// training images only; the held-out loss is the same when measured again for the same LoRA
/// (and for another seed's untrained LoRA, whose `up` matrices are zero too), and moves when
/// training changes the LoRA.
#[test]
fn held_out_images_are_never_trained_on_and_their_loss_is_fixed() {
    let dir = temp("heldout");
    let data = dir.join("data");
    world_dataset(&data, Some(Concept::Zorb), 10, 64, 3);
    let cfg = TrainConfig::from_overrides(&Overrides {
        dataset: Some(data.clone()),
        output_dir: Some(dir.join("out")),
        steps: Some(6),
        batch_size: Some(2),
        rank: Some(4),
        learning_rate: Some(1e-2),
        resolution: Some(vec![64]),
        validation_split: Some("0.2".into()),
        seed: Some(9),
        ..Default::default()
    })
    .unwrap();
    let (cfg, location, check) = prepare(&cfg).unwrap();
    let (train, held) = loragate::train::split_images(&cfg, &check).unwrap();
    let names = |v: &[loragate::train::dataset::TrainImage]| v.iter().map(|i| i.rel.clone()).collect::<std::collections::BTreeSet<_>>();
    let (train_names, held_names) = (names(&train), names(&held));
    assert_eq!((train_names.len(), held_names.len()), (8, 2));
    assert!(train_names.is_disjoint(&held_names));
    assert_eq!(train_names.union(&held_names).cloned().collect::<std::collections::BTreeSet<_>>(), names(&check.images));
    assert_eq!(loragate::train::split_images(&cfg, &check).unwrap().1.iter().map(|i| &i.rel).collect::<Vec<_>>(), held.iter().map(|i| &i.rel).collect::<Vec<_>>(), "the split is fixed by the seed");

    let pipe = Pipeline::load(&location, DType::F32, &Device::Cpu).unwrap();
    let mut trainer = Trainer::new(&pipe, cfg.clone(), train.clone(), &Progress::hidden()).unwrap();
    trainer.set_heldout(&held, &Progress::hidden()).unwrap();
    assert_eq!(trainer.heldout_len(), 2);
    assert!(trainer.images.iter().all(|i| !held_names.contains(&i.rel)));
    let before = trainer.heldout_loss().unwrap().unwrap();
    assert_eq!(before.to_bits(), trainer.heldout_loss().unwrap().unwrap().to_bits(), "measured again, the same LoRA gives the same held-out loss");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..cfg.steps {
        trainer.train_step().unwrap();
        seen.extend(trainer.last_batch().iter().map(|&i| trainer.images[i].rel.clone()));
    }
    // 12 samples from 8 images: one epoch drew every training image, and nothing else.
    assert_eq!(seen, train_names);
    let after = trainer.heldout_loss().unwrap().unwrap();
    assert_eq!(after.to_bits(), trainer.heldout_loss().unwrap().unwrap().to_bits());
    assert!((after - before).abs() > 1e-5, "training moved the held-out loss: {before} → {after}");
    eprintln!("held-out loss {before:.6} → {after:.6} after {} steps", cfg.steps);
    trainer.network.detach();
    // Another seed: another initial LoRA (with `up` zero, so no change yet) and another batch
    // order, but the same held-out noise and timesteps: the same number before training.
    let mut other = cfg.clone();
    other.seed = 1234;
    let mut t2 = Trainer::new(&pipe, other, train, &Progress::hidden()).unwrap();
    t2.set_heldout(&held, &Progress::hidden()).unwrap();
    assert_eq!(t2.heldout_loss().unwrap().unwrap().to_bits(), before.to_bits());
    t2.network.detach();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tiny real run with `early_stop`: it stops at the first checkpoint where the rule says so
/// (checked against the rule on the run's own numbers), says so in the log, the report and the
/// chosen file's metadata, and ships the checkpoint with the lowest held-out loss (no suite).
#[test]
fn a_run_stops_early_when_the_held_out_loss_stops_improving() {
    let dir = temp("early-stop");
    let data = dir.join("data");
    world_dataset(&data, Some(Concept::Zorb), 8, 64, 6);
    let cfg = TrainConfig::from_overrides(&Overrides {
        dataset: Some(data.clone()),
        output_dir: Some(dir.join("out")),
        steps: Some(16),
        batch_size: Some(2),
        rank: Some(4),
        learning_rate: Some(EARLY_STOP_LR),
        lr_schedule: Some("constant".into()),
        warmup_steps: Some(0),
        resolution: Some(vec![64]),
        checkpoint_every: Some(2),
        validation_split: Some("0.25".into()),
        early_stop_patience: Some(1),
        ..Default::default()
    })
    .unwrap();
    let mut lines = Vec::new();
    let outcome = loragate::train::run(&cfg, &TrainOptions::cpu(), &mut |l| lines.push(l.to_string())).unwrap();
    let text = lines.join("\n");
    eprintln!("{text}");
    let evals = &outcome.evaluations;
    let heldout: Vec<f64> = evals.iter().map(|e| e.heldout.unwrap()).collect();
    let first_stop = (1..=evals.len()).find(|&n| loragate::train::pick::stop_reason(&evals[..n], 1).is_some());
    assert_eq!(first_stop, Some(evals.len()), "stopped at the first checkpoint the rule stops at: {heldout:?}");
    let last = evals.last().unwrap().step;
    assert!(last < cfg.steps, "it stopped before {} steps", cfg.steps);
    assert_eq!(outcome.steps.len(), last, "no step after the stop");
    let why = outcome.stopped_early.clone().unwrap();
    assert!(why.starts_with(&format!("at step {last} of 16: neither the held-out loss nor the suite's scores improved")), "{why}");
    assert!(text.contains("stopped early"), "{text}");
    // No suite: the lowest held-out loss is shipped.
    let (best_i, _) = heldout.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).unwrap();
    assert_eq!(outcome.best, Some(evals[best_i].step));
    let file = LoraFile::load(&outcome.final_path).unwrap();
    assert_eq!(file.metadata["loragate.heldout_loss"], format!("{:.6}", heldout[best_i]));
    assert_eq!(file.metadata["loragate.pick_reason"], outcome.choice.reason);
    assert_eq!(file.metadata["loragate.stopped_early"], why);
    assert_eq!(file.metadata["loragate.pick"], "best");
    let html = std::fs::read_to_string(&outcome.report).unwrap();
    assert!(html.contains("id=\"stopped-early\"") && html.contains(&format!("chosen: step {}", evals[best_i].step)), "the report marks the stop and the pick");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The learning rate of the early-stopping run: high enough that the held-out loss of this
/// tiny set soon stops falling.
const EARLY_STOP_LR: f64 = 3e-2;

/// Training with candle's generic ops (`LORAGATE_GENERIC_OPS=1`, the GPU's path; read once per
/// process, so through the binary) gives the fused CPU kernels' losses and held-out losses.
#[test]
fn training_through_the_generic_ops_matches_the_fused_kernels() {
    let dir = temp("generic-train");
    world_dataset(&dir.join("data"), Some(Concept::Zorb), 6, 64, 8);
    std::fs::write(
        dir.join("train.yaml"),
        "dataset: data\nsteps: 4\nbatch_size: 2\nresolution: 64\nrank: 4\nlearning_rate: 1e-2\ncheckpoint_every: 2\nvalidation_split: 0.34\n",
    )
    .unwrap();
    let run = |out: &str, generic: bool| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_loragate"));
        c.args(["train"]).arg(dir.join("train.yaml")).arg("--out").arg(dir.join(out));
        if generic {
            c.env("LORAGATE_GENERIC_OPS", "1");
        } else {
            c.env_remove("LORAGATE_GENERIC_OPS");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let csv = std::fs::read_to_string(dir.join(out).join("loss.csv")).unwrap();
        csv.lines().skip(1).map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].parse::<f64>().unwrap(), f[5].parse::<f64>().ok())
        }).collect::<Vec<_>>()
    };
    let fused = run("fused", false);
    let generic = run("generic", true);
    assert_eq!(fused.len(), 4);
    assert_eq!(fused.iter().filter(|r| r.1.is_some()).count(), 2, "held-out loss at steps 2 and 4");
    for (a, b) in fused.iter().zip(&generic) {
        assert!((a.0 - b.0).abs() <= 1e-4 * a.0.abs().max(1e-3), "loss {} vs {}", a.0, b.0);
        match (a.1, b.1) {
            (Some(x), Some(y)) => assert!((x - y).abs() <= 1e-4 * x.abs(), "held-out loss {x} vs {y}"),
            (None, None) => {}
            other => panic!("held-out columns differ: {other:?}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The committed LoRAs were made by the committed recipes: each recipe parses, and its
/// training settings are the ones recorded in the file's `loragate.training_config` metadata.
#[test]
fn the_committed_loras_match_their_recipes() {
    let repo = common::repo();
    for (recipe, lora) in [("training/zorb.yaml", "assets/loras/zorb-loragate.safetensors"), ("training/zorb-bad.yaml", "tests/fixtures/loras/zorb-bad.safetensors"),
        ("training/zorb-seed2.yaml", "tests/fixtures/loras/zorb-seed2.safetensors"),
    ] {
        let cfg = TrainConfig::load(&repo.join(recipe), &Overrides::default()).unwrap();
        let file = LoraFile::load(&repo.join(lora)).unwrap();
        let recorded: serde_json::Value = serde_json::from_str(&file.metadata["loragate.training_config"]).unwrap();
        let written: serde_json::Value = serde_json::from_str(&cfg.to_json()).unwrap();
        for key in ["rank", "alpha", "targets", "learning_rate", "lr_schedule", "steps", "batch_size", "seed", "caption", "image"] {
            assert_eq!(recorded[key], written[key], "{recipe}: `{key}` differs from what {lora} was trained with");
        }
        assert_eq!(file.metadata["ss_network_dim"], cfg.rank.to_string());
    }
}
