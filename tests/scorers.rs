//! The scorers beyond CLIP against PyTorch: a random-weight transformers `Dinov2Model` of a
//! small config and the LAION aesthetic predictor's published layout, with fixtures computed by
//! `tests/fixtures/scorers/make.py`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use loragate::model::aesthetic::AestheticModel;
use loragate::model::arch::dinov2::Dinov2Config;
use loragate::model::dino::DinoModel;
use loragate::model::noise::Rng;
use loragate::tensors::{SaveDtype, TensorFile};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scorers")
}

fn fixture(name: &str) -> Tensor {
    let tf = TensorFile::load(fixtures().join("fixtures.safetensors"), DType::F32, &Device::Cpu).unwrap();
    tf.tensors[name].clone()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn images() -> Vec<image::RgbImage> {
    ["zorb.png", "square.png", "wide.png"].iter().map(|n| image::open(fixtures().join(n)).unwrap().to_rgb8()).collect()
}

#[test]
fn dinov2_matches_transformers_on_its_own_pixels() {
    let model = DinoModel::load(&fixtures().join("dinov2-tiny"), &Device::Cpu).unwrap();
    // 70×70 crops of a model trained at 56: position embeddings interpolated from 4×4 to 5×5.
    let pooled = model.pooled(&fixture("dino.pixel_values")).unwrap();
    let want = fixture("dino.pooled");
    let err = max_abs(&pooled, &want);
    assert!(err < 2e-5, "pooled output differs from transformers by {err}");
}

#[test]
fn dinov2_preprocessing_follows_the_preprocessor_config() {
    let model = DinoModel::load(&fixtures().join("dinov2-tiny"), &Device::Cpu).unwrap();
    assert_eq!(model.preprocess.shortest_edge, 80);
    assert_eq!(model.preprocess.crop, (70, 70));
    let ours = model.pixels(&images()).unwrap();
    let want = fixture("dino.pixel_values");
    // The processor resizes 8-bit images, so its pixels are rounded to 1/255 before
    // normalising: at most about one level apart (1/255/0.224 ≈ 0.018).
    let err = max_abs(&ours, &want);
    assert!(err < 0.04, "pixel_values differ by {err}");
    let mean = (&ours - &want).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(mean < 0.002, "pixel_values differ by {mean} on average");
    // And the embeddings of the images themselves are the transformers ones, normalised.
    let rows = model.image_embedding_rows(&images()).unwrap();
    let want = want_rows(&fixture("dino.pooled"));
    for (i, (a, b)) in rows.iter().zip(&want).enumerate() {
        let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        assert!(cos > 0.999, "image {i}: cosine {cos} with the transformers embedding");
    }
}

fn want_rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| {
            let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            r.into_iter().map(|v| v / n).collect()
        })
        .collect()
}

#[test]
fn dinov2_small_and_base_layouts_load_and_embed_any_image_size() {
    for (config, width) in [(Dinov2Config::small(), 384), (Dinov2Config::base(), 768)] {
        let model = DinoModel::with_random_weights(&config, 3, &Device::Cpu).unwrap();
        // 224 crops: the 37×37 trained grid is interpolated to 16×16.
        let img = image::RgbImage::from_fn(96, 64, |x, y| image::Rgb([x as u8 * 2, y as u8 * 3, 90]));
        let rows = model.image_embedding_rows(&[img.clone(), img]).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].len(), width);
        let norm: f32 = rows[0].iter().map(|v| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-4);
        // Three sizes in one batch: each is resized and cropped on its own.
        assert_batched_equals_alone(&format!("DINOv2 width {width}"), images(), |b| model.image_embedding_rows(b).unwrap());
    }
}

/// A batch of different images embeds each image as it embeds it alone: candle issue #3744
/// gave batched matrix products with a transposed left operand the first item's values for the
/// later ones, which two rows of one image cannot reveal.
fn assert_batched_equals_alone(scorer: &str, images: Vec<image::RgbImage>, embed: impl Fn(&[image::RgbImage]) -> Vec<Vec<f32>>) {
    let batched = embed(&images);
    assert_eq!(batched.len(), images.len());
    for (i, img) in images.iter().enumerate() {
        let alone = embed(std::slice::from_ref(img)).remove(0);
        let d = batched[i].iter().zip(&alone).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d < 1e-5, "{scorer}: image {i} in a batch differs from it alone by {d}");
        // The images must embed differently, or the comparison above proves nothing.
        for (j, other) in batched.iter().enumerate().filter(|(j, _)| *j != i) {
            let apart = batched[i].iter().zip(other).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(apart > 1e-3, "{scorer}: images {i} and {j} embed alike ({apart}): the test needs different embeddings");
        }
    }
}

#[test]
fn the_clip_scorer_embeds_a_batch_as_each_image_alone() {
    let scorer = loragate::model::clip::ClipModel::load(&loragate::model::locate::resolve_scorer("tiny-clip").unwrap(), &Device::Cpu).unwrap();
    // The CLIP scorer takes batches of one size (the harness groups images by size).
    let same_size = images().iter().map(|i| image::imageops::resize(i, 128, 128, image::imageops::FilterType::Triangle)).collect();
    assert_batched_equals_alone("tiny-clip", same_size, |b| scorer.image_embedding_rows(b).unwrap());
}

#[test]
fn dinov2_errors_name_the_file_and_the_missing_key() {
    let dir = std::env::temp_dir().join(format!("loragate-dino-broken-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("dinov2-tiny");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut t = TensorFile::load(src.join("model.safetensors"), DType::F32, &Device::Cpu).unwrap().tensors.into_iter().collect::<BTreeMap<_, _>>();
    t.remove("encoder.layer.1.layer_scale2.lambda1");
    loragate::tensors::save(&dir.join("model.safetensors"), &t, &BTreeMap::new(), SaveDtype::F32).unwrap();
    let err = DinoModel::load(&dir, &Device::Cpu).err().expect("a missing tensor is an error").to_string();
    assert!(err.contains("encoder.layer.1.layer_scale2.lambda1"), "{err}");
    assert!(err.contains(&dir.display().to_string()), "{err}");
}

/// The aesthetic predictor's weights as make.py draws them: loragate's RNG, seed 7, sorted keys.
fn aesthetic_weights() -> BTreeMap<String, Tensor> {
    let shapes: BTreeMap<&str, Vec<usize>> = [
        ("layers.0.weight", vec![1024, 768]),
        ("layers.0.bias", vec![1024]),
        ("layers.2.weight", vec![128, 1024]),
        ("layers.2.bias", vec![128]),
        ("layers.4.weight", vec![64, 128]),
        ("layers.4.bias", vec![64]),
        ("layers.6.weight", vec![16, 64]),
        ("layers.6.bias", vec![16]),
        ("layers.7.weight", vec![1, 16]),
        ("layers.7.bias", vec![1]),
    ]
    .into_iter()
    .collect();
    let mut rng = Rng::new(7);
    shapes
        .iter()
        .map(|(k, shape)| {
            let n: usize = shape.iter().product();
            let scale = if k.ends_with("weight") { 1.0 / (shape[1] as f32).sqrt() } else { 0.1 };
            let vals: Vec<f32> = rng.normals(n).into_iter().map(|v| v * scale).collect();
            (k.to_string(), Tensor::from_vec(vals, shape.clone(), &Device::Cpu).unwrap())
        })
        .collect()
}

#[test]
fn the_aesthetic_predictor_matches_pytorch_in_the_published_layout() {
    let dir = std::env::temp_dir().join(format!("loragate-aesthetic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sac+logos+ava1-l14-linearMSE.safetensors");
    loragate::tensors::save(&file, &aesthetic_weights(), &BTreeMap::new(), SaveDtype::F32).unwrap();
    let model = AestheticModel::load(&file, &Device::Cpu).unwrap();
    assert_eq!(model.input_width(), 768);
    let emb = fixture("aesthetic.embeddings").to_vec2::<f32>().unwrap();
    let want = fixture("aesthetic.scores").to_vec1::<f32>().unwrap();
    let got = model.scores(&emb).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((g - *w as f64).abs() < 1e-5, "score {g} against PyTorch's {w}");
    }
    // A CLIP of another width is refused with what to do.
    let err = model.scores(&[vec![0.1; 512]]).unwrap_err().to_string();
    assert!(err.contains("768") && err.contains("512") && err.contains("trained on"), "{err}");
    // The .pth is refused with the conversion to run.
    let err = AestheticModel::load(&dir.join("x.pth"), &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("safetensors"), "{err}");
    // Another layout is refused by key.
    let mut wrong = aesthetic_weights();
    wrong.remove("layers.6.weight");
    loragate::tensors::save(&dir.join("wrong.safetensors"), &wrong, &BTreeMap::new(), SaveDtype::F32).unwrap();
    let err = AestheticModel::load(&dir.join("wrong.safetensors"), &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("layers.6.weight"), "{err}");
}
