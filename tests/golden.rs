//! What a seed means, pinned: the RNG's first values (computed independently from the published
//! algorithms), an image that does not depend on the batch it was made in, and golden images per
//! generator version, so pixels cannot change while `GENERATOR_VERSION` stays the same (cached
//! images and baselines would then lie about what produced them).

mod common;

use std::path::PathBuf;

use candle_core::Device;
use loragate::harness::cache::GENERATOR_VERSION;
use loragate::imageio::{read_image, tensor_to_images, write_png};
use loragate::model::GenerationParams;
use loragate::model::noise::{Rng, initial_latents};
use loragate::model::scheduler::SamplerKind;
use loragate::score::pixels::{max_abs_diff, mean_abs_diff};

/// xoshiro256** seeded through SplitMix64 and Box–Muller normals, the values computed by an
/// independent Python implementation of the published algorithms (docs/suites.md, "Seeds").
#[test]
fn the_rng_gives_the_documented_sequence() {
    let mut r = Rng::new(0);
    assert_eq!([r.next_u64(), r.next_u64(), r.next_u64()], [0x99ec5f36cb75f2b4, 0xbf6e1f784956452a, 0x1a5f849d4933e6e0]);
    let mut r = Rng::new(42);
    assert_eq!([r.next_u64(), r.next_u64(), r.next_u64()], [0x15780b2e0c2ec716, 0x6104d9866d113a7e, 0xae17533239e499a1]);
    // Bit patterns of the f32 normals (−0.279024, 1.527723, 1.899769, −0.226696, 2.136306, −2.196918).
    let normals: Vec<u32> = Rng::new(7).normals(6).into_iter().map(f32::to_bits).collect();
    assert_eq!(normals, [0xbe8edc3c, 0x3fc38c6f, 0x3ff32b9e, 0xbe6822ee, 0x4008b93d, 0xc00c9a4d]);
}

#[test]
fn image_i_of_a_batch_has_the_noise_of_its_seed_alone() {
    let batch = initial_latents(&[5, 6, 7], 4, 16, 16, &Device::Cpu).unwrap();
    for (i, seed) in [5u64, 6, 7].into_iter().enumerate() {
        let alone = initial_latents(&[seed], 4, 16, 16, &Device::Cpu).unwrap();
        let row = batch.narrow(0, i, 1).unwrap();
        assert_eq!(row.flatten_all().unwrap().to_vec1::<f32>().unwrap(), alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "seed {seed}");
    }
}

fn params(sampler: SamplerKind) -> GenerationParams {
    GenerationParams { steps: 10, guidance: 5.0, width: 128, height: 128, sampler, ..Default::default() }
}

#[test]
fn image_i_of_a_batch_equals_its_seed_generated_alone() {
    let pipe = common::tiny();
    let p = params(SamplerKind::Ddim);
    let prompts = ["red circle, large, in the center, sky background", "blue square, small, on the left, white background"];
    let batch = tensor_to_images(&pipe.generate(&prompts, &[3, 4], &p, &mut |_, _| {}).unwrap()).unwrap();
    for (i, (prompt, seed)) in prompts.iter().zip([3u64, 4]).enumerate() {
        let alone = tensor_to_images(&pipe.generate(&[prompt], &[seed], &p, &mut |_, _| {}).unwrap()).unwrap();
        let d = max_abs_diff(&batch[i], &alone[0]).unwrap();
        assert!(d <= 1.0 / 255.0, "image {i} differs from seed {seed} alone by {:.1}/255", d * 255.0);
    }
}

fn golden(name: &str) -> PathBuf {
    common::fixtures().join("golden").join(format!("{GENERATOR_VERSION}-{name}.png"))
}

/// Pixels of today's generator against the golden images of its version. A difference beyond
/// float noise across CPUs means the generator changed pixels: bump `GENERATOR_VERSION`
/// (src/harness/cache.rs) and bless new golden images with `LORAGATE_BLESS=1`.
#[test]
fn pixels_change_only_with_the_generator_version() {
    let pipe = common::tiny();
    let bless = std::env::var("LORAGATE_BLESS").is_ok_and(|v| v == "1");
    for (name, sampler) in [("ddim", SamplerKind::Ddim), ("euler", SamplerKind::Euler)] {
        let img = tensor_to_images(&pipe.generate(&["zorb, large, on the left, grass background"], &[11], &params(sampler), &mut |_, _| {}).unwrap()).unwrap().remove(0);
        let path = golden(name);
        if bless {
            write_png(&path, &img, &[]).unwrap();
            continue;
        }
        assert!(
            path.is_file(),
            "no golden image for generator version {GENERATOR_VERSION} ({}): if you bumped the version on purpose, run `LORAGATE_BLESS=1 cargo test --release --test golden`",
            path.display()
        );
        let want = read_image(&path).unwrap();
        let (max, mean) = (max_abs_diff(&img, &want).unwrap() * 255.0, mean_abs_diff(&img, &want).unwrap() * 255.0);
        assert!(
            max <= 2.0 && mean <= 0.05,
            "{name}: pixels moved by up to {max:.1}/255 (mean {mean:.3}/255) while GENERATOR_VERSION is still {GENERATOR_VERSION}: bump it in src/harness/cache.rs and bless new golden images"
        );
    }
}

/// Which algorithm a 3×3 convolution takes depends on the 4×4 output tiles of the call
/// (`conv::takes_winograd`), so on the batch: row groups split a batch over two threads, and a
/// layer that runs im2col for one image runs Winograd in a larger batch. The same seed must give
/// the same image on both sides of that switch, and match its golden image.
#[test]
fn an_image_is_the_same_on_both_sides_of_the_winograd_switch() {
    use loragate::model::conv::record_paths;
    let p = params(SamplerKind::Ddim);
    let prompt = "zorb, large, on the left, grass background";
    let prompts = [prompt, "blue square, small, on the left, white background", "red circle, large, in the center, sky background", "zorb, small, on the right, sky background"];
    let batch: Vec<&str> = (0..8).map(|i| prompts[i % 4]).collect();
    let seeds: Vec<u64> = (11..19).collect();
    // Two threads, as on the CI machine: the batch then runs as two row groups. (The pipeline
    // is made inside the pool: it is not `Sync`.)
    let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let ((alone, one_paths), (together, batch_paths)) = two.install(|| {
        let pipe = common::tiny();
        let first = |images: candle_core::Tensor| tensor_to_images(&images).unwrap().remove(0);
        (
            record_paths(|| first(pipe.generate(&[prompt], &[11], &p, &mut |_, _| {}).unwrap())),
            record_paths(|| first(pipe.generate(&batch, &seeds, &p, &mut |_, _| {}).unwrap())),
        )
    });
    // The layers that switched: im2col for the single image's rows, Winograd for the batch's
    // (rows of each call are recorded, so other tests' convolutions cannot stand in).
    let shape = |c: &loragate::model::conv::ConvPath| (c.c, c.o, c.k, c.ho, c.wo);
    let rows_alone = one_paths.iter().filter(|c| c.k == 3 && !c.winograd).map(|c| c.rows).max();
    let switched: std::collections::BTreeSet<_> = one_paths
        .iter()
        .filter(|a| a.k == 3 && !a.winograd && a.rows <= 2)
        .filter(|a| batch_paths.iter().any(|b| b.winograd && b.rows >= 8 && shape(b) == shape(a)))
        .map(shape)
        .collect();
    assert!(!switched.is_empty(), "no layer crossed the switch (im2col alone at up to {rows_alone:?} rows):\nalone {one_paths:?}\nbatch {batch_paths:?}");
    eprintln!("layers on im2col alone and on Winograd in the batch (C, O, k, Ho, Wo): {switched:?}");
    let d = max_abs_diff(&alone, &together).unwrap() * 255.0;
    assert!(d <= 1.0, "seed 11 alone and in a batch of 8 differ by {d:.1}/255");
    let want = read_image(&golden("ddim")).unwrap();
    let (max, mean) = (max_abs_diff(&together, &want).unwrap() * 255.0, mean_abs_diff(&together, &want).unwrap() * 255.0);
    assert!(max <= 2.0 && mean <= 0.05, "seed 11 in a batch of 8 against its golden image: {max:.1}/255 max, {mean:.3}/255 mean");
}
