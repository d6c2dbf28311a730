//! The same parity tests as tests/parity.rs, through candle's generic ops
//! (`LORAGATE_GENERIC_OPS=1`): the code path CUDA, half precision and training take, proven
//! on the CPU against the same PyTorch fixtures and tolerances.

mod common;

const GENERIC: bool = true;

include!("common/parity_cases.rs");

/// The switch really changes the code path: the fused and generic UNet calls differ in the
/// last bits (other summation orders) and agree to float noise.
#[test]
fn the_generic_path_is_another_code_path_with_the_same_numbers() {
    let _mode = setup();
    let pipe = tiny();
    let x = fixture("unet.sample");
    let t = fixture("unet.timestep");
    let c = fixture("unet.context");
    let generic = pipe.unet.forward(&x, &t, &c, None).unwrap();
    loragate::model::ops::set_generic_ops(false);
    let fused = pipe.unet.forward(&x, &t, &c, None).unwrap();
    loragate::model::ops::set_generic_ops(true);
    let d = max_abs_diff(&generic, &fused);
    assert!(d > 0.0, "the switch did not change the code path");
    assert!(d < 1e-4, "fused and generic UNet calls differ by {d}");
}

/// Training on a GPU takes the generic path: five training steps through it give the losses
/// and LoRA updates of five steps through the fused CPU kernels, to float noise. AdamW divides
/// each entry's step by that entry's own gradient size, so entries whose gradients are nearly
/// zero turn rounding differences into visible ones: the updates are compared as one vector.
#[test]
fn training_through_the_generic_path_matches_the_fused_kernels() {
    use loragate::progress::Progress;
    use loragate::train::config::Overrides;
    use loragate::train::dataset::TrainImage;
    use loragate::train::{TrainConfig, Trainer};
    let _mode = setup();
    let pipe = tiny();
    let cfg = TrainConfig::from_overrides(&Overrides {
        dataset: Some("unused".into()),
        rank: Some(4),
        steps: Some(5),
        batch_size: Some(2),
        resolution: Some(vec![64]),
        targets: Some(["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "proj_in", "conv1"].iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    })
    .unwrap();
    let mut rng = loragate::model::noise::Rng::new(11);
    let images: Vec<TrainImage> = ["zorb, large", "zorb, small, on the left"]
        .iter()
        .map(|caption| TrainImage {
            rel: format!("1_x/{caption}.png"),
            image: image::RgbImage::from_fn(64, 64, |_, _| image::Rgb([0, 1, 2].map(|_| (rng.uniform() * 255.0) as u8))),
            caption: caption.to_string(),
            repeats: 1,
            folder: "1_x".into(),
        })
        .collect();
    let run = |generic: bool| {
        loragate::model::ops::set_generic_ops(generic);
        let mut t = Trainer::new(&pipe, cfg.clone(), images.clone(), &Progress::hidden()).unwrap();
        let start: Vec<candle_core::Tensor> = t.network.vars().iter().map(|v| v.as_tensor().copy().unwrap()).collect();
        let losses: Vec<f64> = (0..cfg.steps).map(|_| t.train_step().unwrap().loss).collect();
        let moved: Vec<f32> = t
            .network
            .vars()
            .iter()
            .zip(&start)
            .flat_map(|(v, s)| (v.as_tensor() - s).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        t.network.detach();
        (losses, moved)
    };
    let (generic_losses, generic_moved) = run(true);
    let (fused_losses, fused_moved) = run(false);
    loragate::model::ops::set_generic_ops(true);
    let loss_diff = generic_losses.iter().zip(&fused_losses).map(|(a, b)| (a - b).abs() / b).fold(0f64, f64::max);
    let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let update_diff = norm(&mut generic_moved.iter().zip(&fused_moved).map(|(a, b)| a - b)) / norm(&mut fused_moved.iter().copied());
    eprintln!("after {} steps: losses differ by {loss_diff:.1e}, the LoRA updates by {update_diff:.1e} (relative)", cfg.steps);
    assert!(generic_losses.iter().all(|l| l.is_finite()), "{generic_losses:?}");
    assert!(loss_diff < 1e-5, "losses: generic {generic_losses:?}, fused {fused_losses:?}");
    assert!(update_diff < 1e-3, "the LoRA updates differ by {update_diff} after {} steps", cfg.steps);
}
