//! The CPU cost of full-size LoRA training: SD 1.5's or SDXL's UNet (published configs, random
//! weights) with rank-8 LoRAs on the documented targets (attention, `ff.net.0.proj`, `proj_in`,
//! ResNet `conv1`), batch 1 at `PX` pixels, `STEPS` training steps (the trainer's loss and
//! gradients, clipping and AdamW) after one warm-up step. For the numbers in docs/training.md,
//! run it under `/usr/bin/time -v` for the peak memory:
//!
//! `cargo run --release --example fullsize_step -- sd15|sdxl PX [STEPS]`

use std::cell::RefCell;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use loragate::model::adapters::AdapterTargets;
use loragate::model::noise::{Rng, randn};
use loragate::model::params::{Params, WeightStore};
use loragate::model::scheduler::{NoiseSchedule, ScheduleConfig};
use loragate::model::unet::{AddedConditioning, UNet, UNetConfig};
use loragate::train::network::{Network, select_layers};
use loragate::train::optim::{AdamW, AdamWConfig, clip_grad_norm};
use loragate::train::r#loop::{StepBatch, gradients, sdxl_time_ids, step_loss};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: fullsize_step sd15|sdxl PX [STEPS]";
    let cfg = match args.get(1).map(String::as_str) {
        Some("sd15") => UNetConfig::sd15(),
        Some("sdxl") => UNetConfig::sdxl(),
        _ => panic!("{usage}"),
    };
    let px: usize = args.get(2).and_then(|s| s.parse().ok()).expect(usage);
    let steps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2);

    let t0 = Instant::now();
    let store = WeightStore::random(1, DType::F32, &Device::Cpu);
    let t = RefCell::new(AdapterTargets::default());
    let unet = UNet::load(&Params::root(&store, &t), &cfg).unwrap();
    let mut targets = AdapterTargets::default();
    targets.extend_prefixed("unet", &t.into_inner());
    let names: Vec<String> = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "proj_in", "conv1"].map(String::from).to_vec();
    let layers = select_layers(&targets, &names).unwrap();
    let mut rng = Rng::new(2);
    let network = Network::new(&layers, 8, 8.0, &mut rng, DType::F32, &Device::Cpu).unwrap();
    network.attach();
    let mut opt = AdamW::new(network.vars(), AdamWConfig::default()).unwrap();
    eprintln!("{} LoRA modules; random weights in {:.1} s", network.modules.len(), t0.elapsed().as_secs_f64());

    let schedule = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
    let latent = px / 8;
    let batch = |rng: &mut Rng| StepBatch {
        latents: randn(rng, &[1, 4, latent, latent], &Device::Cpu).unwrap(),
        noise: randn(rng, &[1, 4, latent, latent], &Device::Cpu).unwrap(),
        timesteps: vec![rng.below(1000)],
        context: randn(rng, &[1, 77, cfg.context_dim()], &Device::Cpu).unwrap(),
        added: cfg.is_sdxl_style().then(|| AddedConditioning {
            text_embeds: randn(rng, &[1, 1280], &Device::Cpu).unwrap(),
            time_ids: Tensor::new(&[sdxl_time_ids((px, px), (px, px))], &Device::Cpu).unwrap(),
        }),
    };
    let mut times = Vec::new();
    for i in 0..=steps {
        let t = Instant::now();
        let loss = step_loss(&unet, &schedule, &batch(&mut rng)).unwrap();
        let mut g = gradients(&loss, opt.vars()).unwrap();
        clip_grad_norm(&mut g, 1.0).unwrap();
        opt.step(&g, 1e-4).unwrap();
        let secs = t.elapsed().as_secs_f64();
        eprintln!("step {i}: loss {:.4}, {secs:.1} s", loss.to_scalar::<f32>().unwrap());
        if i > 0 {
            times.push(secs);
        }
    }
    println!(
        "{} at {px}² (batch 1, {} threads): {:.1} s a training step (mean of {steps} after a warm-up)",
        args[1],
        rayon::current_num_threads(),
        times.iter().sum::<f64>() / times.len().max(1) as f64
    );
}
