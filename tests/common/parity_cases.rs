// The parity tests, shared by tests/parity.rs (fused f32 CPU kernels) and
// tests/parity_generic.rs (candle's generic ops, the path CUDA takes): the same fixtures, the
// same tolerances. Each test runs under `setup()`, which picks the path and holds a lock so the
// process-wide switch cannot change under a running test.

use candle_core::{DType, IndexOp};
use common::{fixture, max_abs_diff, mean_abs_diff, parity_json, tiny};
use loragate::model::GenerationParams;
use loragate::model::text_encoder::LayerChoice;

static MODE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn setup() -> std::sync::MutexGuard<'static, ()> {
    let guard = MODE.lock().unwrap_or_else(|e| e.into_inner());
    loragate::model::ops::set_generic_ops(GENERIC);
    guard
}

#[test]
fn tokenizer_gives_the_reference_ids() {
    let _mode = setup();
    let pipe = tiny();
    let meta = parity_json();
    let mut prompts: Vec<String> = meta["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    prompts.push(String::new());
    let want = fixture("te.input_ids").to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    for (p, w) in prompts.iter().zip(&want) {
        let got: Vec<i64> = pipe.tokenizer.encode(p).ids.iter().map(|&i| i as i64).collect();
        assert_eq!(&got, w, "prompt {p:?}");
    }
}

#[test]
fn text_encoder_matches_transformers() {
    let _mode = setup();
    let pipe = tiny();
    let ids = fixture("te.input_ids").to_dtype(DType::U32).unwrap();
    let got = pipe.text_encoder.forward(&ids, LayerChoice::LAST).unwrap().hidden;
    let want = fixture("te.last_hidden_state");
    let d = max_abs_diff(&got, &want);
    eprintln!("text encoder max abs diff {d:e}");
    assert!(d < 1e-3, "text encoder max abs diff {d}");
}

#[test]
fn one_unet_call_matches_diffusers_with_a_timestep_per_item() {
    let _mode = setup();
    let pipe = tiny();
    let x = fixture("unet.sample");
    let t = fixture("unet.timestep");
    let ctx = fixture("unet.context");
    // Both rows in one batch, each with its own timestep (981 and 401).
    let got = pipe.unet.forward(&x, &t, &ctx, None).unwrap();
    let want = fixture("unet.eps");
    let d = max_abs_diff(&got, &want);
    eprintln!("UNet max abs diff {d:e}");
    assert!(d < 1e-3, "UNet max abs diff {d}");
}

#[test]
fn a_guided_batch_equals_each_of_its_rows_alone() {
    // Each latent twice with two contexts, as under guidance: the UNet runs its context-free
    // first layers once for both halves. Every row must equal that row computed alone.
    let _mode = setup();
    let pipe = tiny();
    let x0 = fixture("unet.sample").i(0..1).unwrap();
    let t0 = fixture("unet.timestep").i(0..1).unwrap();
    let ctx = fixture("unet.context");
    let x = candle_core::Tensor::cat(&[&x0, &x0], 0).unwrap();
    let t = candle_core::Tensor::cat(&[&t0, &t0], 0).unwrap();
    let together = pipe.unet.forward(&x, &t, &ctx, None).unwrap();
    for row in 0..2 {
        let alone = pipe.unet.forward(&x0, &t0, &ctx.i(row..row + 1).unwrap(), None).unwrap();
        let d = max_abs_diff(&together.i(row..row + 1).unwrap(), &alone);
        assert!(d < 1e-5, "row {row}: max abs diff {d}");
    }
    assert!(max_abs_diff(&together.i(0..1).unwrap(), &together.i(1..2).unwrap()) > 1e-3, "the two contexts give different outputs");
}

#[test]
fn row_groups_give_the_whole_batch_result() {
    // On a multi-threaded CPU, `predict` and the VAE's decode run a batch as two row groups at
    // once (guidance's pairs kept together): every row must equal the one-call batch's, up to
    // float rounding (products of other sizes may sum in another order, as in the test above).
    let _mode = setup();
    let pipe = tiny();
    let two_threads = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let sample = fixture("unet.sample");
    let context = fixture("unet.context");
    for latents in 1..=3usize {
        // Distinct latents, each twice (unconditional rows, then conditional), as the pipeline passes them.
        let x: Vec<_> = (0..latents).map(|i| (sample.i(i % 2..i % 2 + 1).unwrap() * (1.0 + 0.25 * i as f64)).unwrap()).collect();
        let x = candle_core::Tensor::cat(&[x.clone(), x].concat(), 0).unwrap();
        let rows = 2 * latents;
        let t = candle_core::Tensor::full(501f32, rows, &candle_core::Device::Cpu).unwrap();
        let ctx: Vec<_> = (0..rows).map(|r| context.i(r * 2 / rows..r * 2 / rows + 1).unwrap()).collect();
        let ctx = candle_core::Tensor::cat(&ctx, 0).unwrap();
        let whole = two_threads.install(|| pipe.unet.forward(&x, &t, &ctx, None)).unwrap();
        let grouped = two_threads.install(|| pipe.unet.predict(&x, &t, &ctx, None)).unwrap();
        let d = max_abs_diff(&whole, &grouped);
        assert!(d < 1e-5, "{latents} latents: UNet in row groups differs by {d}");
    }
    // The decode runs two row groups of images one at a time on the CPU: it must equal one
    // pass over the whole batch.
    let z = fixture("vae.latents");
    let z = candle_core::Tensor::cat(&[&z, &(&z * 0.5).unwrap(), &(&z * -1.0).unwrap()], 0).unwrap();
    let grouped = two_threads.install(|| pipe.vae.decode_unclamped(&z)).unwrap();
    let one_pass = two_threads.install(|| pipe.vae.decode_unclamped_in_one_pass(&z)).unwrap();
    let d = max_abs_diff(&one_pass, &grouped);
    assert!(d < 1e-5, "VAE decode in row groups differs by {d}");
    // The same for the encoder (a training run's latent cache).
    let grouped = two_threads.install(|| pipe.vae.encode(&one_pass.clamp(0f32, 1f32).unwrap())).unwrap();
    let encoded_once = two_threads.install(|| pipe.vae.encode_in_one_pass(&one_pass.clamp(0f32, 1f32).unwrap())).unwrap();
    assert_eq!(grouped.dims(), &[6, 4, 16, 16]);
    let d = max_abs_diff(&encoded_once, &grouped);
    assert!(d < 1e-5, "VAE encode in row groups differs by {d}");
}

#[test]
fn vae_decode_and_encode_match_diffusers() {
    let _mode = setup();
    let pipe = tiny();
    let decoded = pipe.vae.decode(&fixture("vae.latents")).unwrap();
    let d = max_abs_diff(&decoded, &fixture("vae.decoded"));
    eprintln!("VAE decode max abs diff {d:e}");
    assert!(d < 1e-3, "VAE decode max abs diff {d}");
    let encoded = pipe.vae.encode(&fixture("vae.decoded")).unwrap();
    let d = max_abs_diff(&encoded, &fixture("vae.encoded_mean"));
    eprintln!("VAE encode max abs diff {d:e}");
    assert!(d < 1e-3, "VAE encode max abs diff {d}");
}

#[test]
fn vae_batched_decode_equals_one_at_a_time() {
    let _mode = setup();
    // candle #3744: a transposed left operand breaks batched matmuls after the first item.
    let pipe = tiny();
    let z = fixture("vae.latents");
    // One pass over the batch (`decode` itself goes image by image on the CPU).
    let both = pipe.vae.decode_unclamped_in_one_pass(&z).unwrap();
    for i in 0..2 {
        let one = pipe.vae.decode_unclamped(&z.narrow(0, i, 1).unwrap()).unwrap();
        let d = max_abs_diff(&both.i(i).unwrap(), &one.i(0).unwrap());
        assert!(d < 1e-5, "batched decode differs from single decode for item {i}: {d}");
    }
}

#[test]
fn full_pipeline_matches_diffusers() {
    let _mode = setup();
    let pipe = tiny();
    let meta = parity_json();
    let prompts: Vec<&str> = meta["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    let latents = fixture("pipe.latents");
    let params = GenerationParams { steps: 20, guidance: 5.0, ..Default::default() };
    let got = pipe.generate_from_latents(&prompts, &latents, &params, &mut |_, _| {}).unwrap();
    let want = fixture("pipe.images");
    let max = max_abs_diff(&got, &want);
    let mean = mean_abs_diff(&got, &want);
    eprintln!("pipeline max {:.4}/255 mean {:.5}/255", max * 255.0, mean * 255.0);
    // 20 steps of a chaotic ODE amplify 1e-5 per-call differences; see docs/models.md, "Parity with diffusers".
    assert!(max < 0.5 / 255.0, "pipeline max abs diff {max} ({:.2}/255)", max * 255.0);
    assert!(mean < 0.02 / 255.0, "pipeline mean abs diff {mean} ({:.3}/255)", mean * 255.0);
}

#[test]
fn ddim_timesteps_match_diffusers() {
    let _mode = setup();
    let pipe = tiny();
    let want: Vec<usize> = parity_json()["ddim_timesteps"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    assert_eq!(pipe.schedule.timesteps(20).unwrap(), want);
}


#[test]
fn zorb_lora_matches_diffusers_in_both_formats_and_weights() {
    let _mode = setup();
    use loragate::lora::{LoraFile, LoraStack};
    let pipe = tiny();
    let meta = parity_json();
    let prompts: Vec<&str> = meta["lora_prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    let latents = fixture("lora.latents");
    let params = GenerationParams { steps: 20, guidance: 5.0, ..Default::default() };
    for format in ["diffusers", "kohya"] {
        let lora = LoraFile::load(&common::shared_loras().join(format!("zorb.{format}.safetensors"))).unwrap();
        let mut stack = LoraStack::resolve(&pipe, &[(&lora, 1.0)]).unwrap();
        for weight in [1.0, 0.5] {
            // The weight changes on the bound stack: no reload, no re-resolution.
            stack.set_weights(&[weight]).unwrap();
            let report = stack.apply(&pipe).unwrap();
            assert_eq!(report.entries[0].tensors_applied, lora.tensor_count);
            let got = pipe.generate_from_latents(&prompts, &latents, &params, &mut |_, _| {}).unwrap();
            let want = fixture(&format!("lora.{format}.w{weight:.1}.images"));
            let max = max_abs_diff(&got, &want);
            let mean = mean_abs_diff(&got, &want);
            eprintln!("{format} w{weight}: max {:.4}/255 mean {:.5}/255", max * 255.0, mean * 255.0);
            assert!(max < 0.5 / 255.0 && mean < 0.02 / 255.0, "{format} at {weight}: max {max} mean {mean}");
        }
    }
    // Removing the LoRA restores the base model exactly.
    LoraStack::default().apply(&pipe).unwrap();
    let base = pipe.generate_from_latents(&prompts, &latents, &params, &mut |_, _| {}).unwrap();
    let with = fixture("lora.diffusers.w1.0.images");
    assert!(mean_abs_diff(&base, &with) > 0.005, "the LoRA should move the images");
}

#[test]
fn clip_scorer_matches_transformers() {
    let _mode = setup();
    use loragate::model::locate::resolve_scorer;
    use loragate::model::clip::ClipModel;
    let scorer = ClipModel::load(&resolve_scorer("tiny-clip").unwrap(), &candle_core::Device::Cpu).unwrap();
    // Preprocessing: 128 → 64 antialiased bicubic, then OpenAI normalisation.
    let pixels = scorer.preprocess(&fixture("pipe.images")).unwrap();
    let d = max_abs_diff(&pixels, &fixture("clip.pixel_values"));
    eprintln!("CLIP preprocess max abs diff {d:e}");
    assert!(d < 2e-3, "preprocess max abs diff {d}");
    let ie = scorer.image_embeddings_from_pixels(&fixture("clip.pixel_values")).unwrap();
    let d = max_abs_diff(&ie, &fixture("clip.image_embeds"));
    eprintln!("CLIP image embeds max abs diff {d:e}");
    assert!(d < 1e-3, "image embeddings {d}");
    let ids = fixture("clip.input_ids").to_dtype(DType::U32).unwrap();
    let te = scorer.text_embeddings_from_ids(&ids).unwrap();
    let d = max_abs_diff(&te, &fixture("clip.text_embeds"));
    eprintln!("CLIP text embeds max abs diff {d:e}");
    assert!(d < 1e-3, "text embeddings {d}");
    // End to end from our own preprocessing and tokenizer: the reference cosines.
    let meta = parity_json();
    let prompts: Vec<&str> = meta["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    let cos = loragate::model::clip::row_cosines(&scorer.image_embeddings_from_pixels(&pixels).unwrap(), &scorer.text_embeddings(&prompts).unwrap()).unwrap();
    let want: Vec<f64> = meta["clip_cosine"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    for (g, w) in cos.iter().zip(&want) {
        assert!((g - w).abs() < 1e-3, "cosine {g} vs {w}");
    }
}
