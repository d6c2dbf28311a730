//! Half precision, proven on the CPU: one UNet call, one VAE decode and a short pipeline in f16
//! and bf16 through candle's generic ops (the path a GPU takes; the CLI keeps the CPU in f32),
//! with no NaN or Inf and stated tolerances against f32. And the VAE's f32 fallback: a decode
//! that overflows in half precision is done again in f32 and the run says so, as diffusers'
//! `force_upcast`; `--vae-dtype f32` decodes in f32 from the start.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, max_abs_diff, mean_abs_diff};
use loragate::model::locate::resolve_model;
use loragate::model::{GenerationParams, Pipeline};

fn tiny_in(dtype: DType) -> Pipeline {
    Pipeline::load(&resolve_model("tiny").unwrap(), dtype, &Device::Cpu).unwrap()
}

fn finite(t: &Tensor) -> bool {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite())
}

/// Tolerances against f32, per dtype: (UNet max, UNet mean, VAE max, VAE mean, 8-step pipeline
/// mean in /255), about three times what was measured (f16: 0.0034, 0.00053, 0.0046, 0.00028,
/// 0.06/255; bf16: 0.030, 0.0046, 0.048, 0.0026, 0.59/255). bf16 keeps 8 bits of mantissa to
/// f16's 11, so its bounds are wider. Before group norm and softmax computed their statistics
/// in f32, the f16 VAE was off by 0.34 on average: this test is what caught it.
fn tolerance(dtype: DType) -> [f32; 5] {
    match dtype {
        DType::F16 => [0.01, 0.0015, 0.015, 0.001, 0.2],
        _ => [0.09, 0.015, 0.15, 0.008, 2.0],
    }
}

#[test]
fn unet_vae_and_pipeline_run_in_f16_and_bf16_within_tolerance_of_f32() {
    let f32_pipe = tiny_in(DType::F32);
    let (x, t, c) = (fixture("unet.sample"), fixture("unet.timestep"), fixture("unet.context"));
    let eps32 = f32_pipe.unet.forward(&x, &t, &c, None).unwrap();
    let z = fixture("vae.latents");
    let img32 = f32_pipe.decode(&z).unwrap();
    let params = GenerationParams { steps: 8, guidance: 5.0, width: 128, height: 128, ..Default::default() };
    let prompts = ["red circle, large, in the center, sky background", "zorb, small, on the left, grass background"];
    let gen32 = f32_pipe.generate(&prompts, &[1, 2], &params, &mut |_, _| {}).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let [unet_max, unet_mean, vae_max, vae_mean, pipe_mean] = tolerance(dtype);
        let pipe = tiny_in(dtype);
        let eps = pipe.unet.forward(&x.to_dtype(dtype).unwrap(), &t, &c.to_dtype(dtype).unwrap(), None).unwrap();
        assert_eq!(eps.dtype(), dtype);
        assert!(finite(&eps), "{dtype:?}: the UNet made NaN or Inf");
        let eps = eps.to_dtype(DType::F32).unwrap();
        let (m, a) = (max_abs_diff(&eps, &eps32), mean_abs_diff(&eps, &eps32));
        eprintln!("{dtype:?} UNet: max {m:.4}, mean {a:.5}");
        assert!(m < unet_max && a < unet_mean, "{dtype:?} UNet against f32: max {m}, mean {a}");

        let img = pipe.decode(&z.to_dtype(dtype).unwrap()).unwrap().to_dtype(DType::F32).unwrap();
        assert!(finite(&img));
        let (m, a) = (max_abs_diff(&img, &img32), mean_abs_diff(&img, &img32));
        eprintln!("{dtype:?} VAE: max {m:.4}, mean {a:.5}");
        assert!(m < vae_max && a < vae_mean, "{dtype:?} VAE against f32: max {m}, mean {a}");
        assert!(pipe.take_notes().is_empty(), "the tiny VAE does not overflow in {dtype:?}");

        let images = pipe.generate(&prompts, &[1, 2], &params, &mut |_, _| {}).unwrap().to_dtype(DType::F32).unwrap();
        assert!(finite(&images));
        let a = mean_abs_diff(&images, &gen32) * 255.0;
        eprintln!("{dtype:?} 8-step pipeline: mean {a:.3}/255");
        assert!(a < pipe_mean, "{dtype:?} pipeline against f32: mean {a}/255");
    }
}

#[test]
fn a_vae_that_overflows_in_f16_is_decoded_again_in_f32_and_says_so() {
    let f32_pipe = tiny_in(DType::F32);
    // Latents far outside the VAE's range: activations pass f16's largest value (65504).
    let z = (fixture("vae.latents") * 4000.0).unwrap();
    let raw16 = tiny_in(DType::F16).vae.decode_unclamped(&z.to_dtype(DType::F16).unwrap()).unwrap();
    assert!(!finite(&raw16), "the test needs latents that overflow the f16 VAE");
    let want = f32_pipe.decode(&z).unwrap();
    assert!(finite(&want));

    let pipe = tiny_in(DType::F16);
    let got = pipe.decode(&z.to_dtype(DType::F16).unwrap()).unwrap().to_dtype(DType::F32).unwrap();
    assert!(finite(&got), "the upcast decode is finite");
    assert!(max_abs_diff(&got, &want) < 0.01, "and equals the f32 decode up to the f16 output");
    let notes = pipe.take_notes();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("the VAE overflowed in f16 (NaN or Inf) on 2 of 2 images") && notes[0].contains("force_upcast"), "{notes:?}");
    // Only the images that overflow are upcast: a batchmate that fits keeps its f16 pixels.
    let normal = fixture("vae.latents").narrow(0, 0, 1).unwrap();
    let mixed = Tensor::cat(&[&normal, &z.narrow(0, 1, 1).unwrap()], 0).unwrap().to_dtype(DType::F16).unwrap();
    let got = pipe.decode(&mixed).unwrap();
    let alone = pipe.decode(&normal.to_dtype(DType::F16).unwrap()).unwrap();
    assert_eq!(max_abs_diff(&got.narrow(0, 0, 1).unwrap().to_dtype(DType::F32).unwrap(), &alone.to_dtype(DType::F32).unwrap()), 0.0);
    assert!(pipe.take_notes()[0].contains("on 1 of 2 images"));

    // `--vae-dtype f32`: no retry, no note.
    let mut pipe = tiny_in(DType::F16);
    pipe.set_vae_dtype(DType::F32).unwrap();
    let got = pipe.decode(&z.to_dtype(DType::F16).unwrap()).unwrap().to_dtype(DType::F32).unwrap();
    assert!(finite(&got));
    assert!(pipe.take_notes().is_empty());
}
