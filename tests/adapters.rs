//! The LyCORIS algorithms (LoHa, LoKr, LoCon with Tucker cores, full diffs) and DoRA, against
//! fixtures made once with PEFT, or with LyCORIS's formula where PEFT has no such module
//! (tests/fixtures/adapters/make.py): one UNet call and whole generations; weights, stacks and
//! what is refused.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, mean_abs_diff, tiny};
use loragate::lora::{LoraFile, LoraStack};
use loragate::model::{GenerationParams, Pipeline};
use loragate::tensors::{SaveDtype, TensorFile, serialize};

/// Every adapter file the fixture script writes, by name.
const ADAPTERS: [&str; 6] = ["loha", "lokr", "lokr-factored", "locon-tucker", "full", "dora"];

fn dir() -> PathBuf {
    common::fixtures().join("adapters")
}

fn adapter(name: &str) -> PathBuf {
    dir().join(format!("{name}.safetensors"))
}

fn fx(name: &str) -> Tensor {
    let f = TensorFile::load(dir().join("adapters.safetensors"), DType::F32, &Device::Cpu).unwrap();
    f.tensors.get(name).unwrap_or_else(|| panic!("no fixture {name}")).clone()
}

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("adapters.json")).unwrap()).unwrap()
}

fn unet_call(pipe: &Pipeline) -> Tensor {
    pipe.unet.forward(&fx("unet.sample"), &fx("unet.timestep"), &fx("unet.context"), None).unwrap()
}

fn images(pipe: &Pipeline) -> Tensor {
    let meta = meta();
    let prompts: Vec<&str> = meta["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    let params = GenerationParams { steps: meta["steps"].as_u64().unwrap() as usize, guidance: meta["guidance"].as_f64().unwrap(), ..Default::default() };
    pipe.generate_from_latents(&prompts, &fx("latents"), &params, &mut |_, _| {}).unwrap()
}

/// Applies `lora` alone at `weight` and checks that every tensor was applied.
fn apply(pipe: &Pipeline, lora: &LoraFile, weight: f64) {
    let report = LoraStack::resolve(pipe, &[(lora, weight)]).unwrap().apply(pipe).unwrap();
    assert_eq!(report.entries[0].tensors_applied, lora.tensor_count);
}

#[test]
fn each_adapter_matches_peft_in_a_unet_call_and_in_images() {
    let pipe = tiny();
    let base = unet_call(&pipe);
    for name in ADAPTERS {
        let lora = LoraFile::load(&adapter(name)).unwrap();
        apply(&pipe, &lora, 1.0);
        let eps = unet_call(&pipe);
        let want = fx(&format!("{name}.eps"));
        let d = max_abs_diff(&eps, &want);
        let moved = max_abs_diff(&want, &base);
        let got = images(&pipe);
        let want_images = fx(&format!("{name}.images"));
        let (max, mean) = (max_abs_diff(&got, &want_images), mean_abs_diff(&got, &want_images));
        eprintln!("{name}: UNet max abs diff {d:.2e} (the adapter moves it by {moved:.3}); images max {:.4}/255 mean {:.5}/255", max * 255.0, mean * 255.0);
        assert!(moved > 0.1, "{name}: the fixture should move the UNet's output, moved {moved}");
        assert!(d < 1e-3, "{name}: UNet max abs diff {d}");
        assert!(max < 1.0 / 255.0 && mean < 0.02 / 255.0, "{name}: images max {max} mean {mean}");
    }
    LoraStack::default().apply(&pipe).unwrap();
    assert_eq!(max_abs_diff(&unet_call(&pipe), &base), 0.0, "removing the adapters restores the base model");
}

#[test]
fn dora_in_peft_naming_with_its_adapter_config_matches_the_kohya_file() {
    let pipe = tiny();
    let lora = LoraFile::load(&dir().join("dora-peft").join("adapter_model.safetensors")).unwrap();
    assert_eq!(lora.format, loragate::lora::LoraFormat::Peft);
    assert!(lora.modules.iter().all(|m| m.dora.is_some() && m.scale() == 2.0), "alpha 8 / rank 4 from adapter_config.json");
    apply(&pipe, &lora, 1.0);
    let d = max_abs_diff(&unet_call(&pipe), &fx("dora.eps"));
    eprintln!("DoRA in PEFT naming: UNet max abs diff {d:.2e}");
    assert!(d < 1e-3, "{d}");
}

#[test]
fn dora_strength_interpolates_between_the_base_and_the_dora_weight() {
    // At 0.5 a DoRA gives W + 0.5 (W_dora − W), W_dora being PEFT's merge; at 0 the base model.
    let pipe = tiny();
    let base = unet_call(&pipe);
    let lora = LoraFile::load(&adapter("dora")).unwrap();
    let mut stack = LoraStack::resolve(&pipe, &[(&lora, 1.0)]).unwrap();
    stack.set_weights(&[0.5]).unwrap();
    stack.apply(&pipe).unwrap();
    let d = max_abs_diff(&unet_call(&pipe), &fx("dora.w0.5.eps"));
    eprintln!("DoRA at 0.5: UNet max abs diff {d:.2e}");
    assert!(d < 1e-3, "{d}");
    stack.set_weights(&[0.0]).unwrap();
    stack.apply(&pipe).unwrap();
    assert!(max_abs_diff(&unet_call(&pipe), &base) < 1e-5, "weight 0 is the base model");
}

#[test]
fn stacks_add_each_adapters_change_to_the_base_in_any_order() {
    // A DoRA normalises the base weight plus its own update, never another adapter's: a stack is
    // the base plus each adapter's change alone, whatever the order.
    let pipe = tiny();
    let (dora, loha, lokr) = (LoraFile::load(&adapter("dora")).unwrap(), LoraFile::load(&adapter("loha")).unwrap(), LoraFile::load(&adapter("lokr")).unwrap());
    let key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let layer = pipe.targets().get(key).unwrap().clone();
    let base = layer.base_weight().clone();
    let alone = |l: &LoraFile, w: f64| {
        LoraStack::resolve(&pipe, &[(l, w)]).unwrap().apply(&pipe).unwrap();
        (layer.effective_weight() - &base).unwrap()
    };
    let changes = [alone(&dora, 0.7), alone(&loha, 0.4), alone(&lokr, -0.3)];
    let want = changes.iter().fold(base.clone(), |w, c| (w + c).unwrap());
    for order in [[(&dora, 0.7), (&loha, 0.4), (&lokr, -0.3)], [(&lokr, -0.3), (&loha, 0.4), (&dora, 0.7)]] {
        LoraStack::resolve(&pipe, &order).unwrap().apply(&pipe).unwrap();
        let d = max_abs_diff(&layer.effective_weight(), &want);
        assert!(d < 1e-6, "stacked weight off by {d}");
    }
}

#[test]
fn lokr_with_whole_halves_ignores_alpha() {
    let lora = LoraFile::load(&adapter("lokr")).unwrap();
    assert!(lora.modules.iter().all(|m| m.alpha == Some(16.0) && m.rank().is_none() && m.scale() == 1.0));
    let factored = LoraFile::load(&adapter("lokr-factored")).unwrap();
    assert!(factored.modules.iter().all(|m| m.rank() == Some(2) && m.scale() == 1.5));
}

#[test]
fn inspect_names_each_algorithm_its_factors_and_the_base() {
    let want: [(&str, &[&str]); 6] = [
        ("loha", &["LoHa (Hadamard product of two low-rank pairs) ×", "with a Tucker core", "rank:        4", "text_encoder", "tiny-sd (text width 192)"]),
        ("lokr", &["LoKr (Kronecker product) ×", "none on", "whole", "1 for whole LoKr halves, alpha unused"]),
        ("lokr-factored", &["LoKr (Kronecker product) ×", "Tucker rank 2", "rank:        2", "scale:       1.5000 (alpha / rank)"]),
        ("locon-tucker", &["LoRA/LoCon (low-rank pair) ×", "with a Tucker core", "resnet conv1"]),
        ("full", &["full diff (full-weight difference) ×4", "1 for full diffs"]),
        ("dora", &["LoRA/LoCon (low-rank pair) ×", "DoRA:        magnitudes on", "per output channel", "text_encoder"]),
    ];
    for (name, needles) in want {
        let text = loragate::lora::inspect::summary(&LoraFile::load(&adapter(name)).unwrap());
        for n in needles {
            assert!(text.contains(n), "{name}: {n:?} not in\n{text}");
        }
    }
}

fn bytes_of(tensors: &BTreeMap<String, Tensor>) -> Vec<u8> {
    serialize(tensors, &BTreeMap::new(), SaveDtype::F32).unwrap()
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = loragate::model::noise::Rng::new(seed);
    (loragate::model::noise::randn(&mut rng, shape, &Device::Cpu).unwrap() * 0.01).unwrap()
}

/// `load` must fail with a message that names every needle.
fn refused(name: &str, tensors: &BTreeMap<String, Tensor>, needles: &[&str]) {
    let err = match LoraFile::from_bytes(Path::new(name), &bytes_of(tensors)) {
        Ok(_) => panic!("{name} should be refused"),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(err.contains(n), "{name}: {err:?} should mention {n:?}");
    }
}

#[test]
fn hostile_mixes_are_refused_naming_the_tensor() {
    let m = "lora_unet_down_blocks_0_resnets_0_conv1";
    let t = |pairs: &[(&str, Tensor)]| pairs.iter().map(|(k, v)| (format!("{m}.{k}"), v.clone())).collect::<BTreeMap<_, _>>();
    // LoHa names with LoKr shapes: the two halves make updates of different shapes.
    refused(
        "loha-as-lokr.safetensors",
        &t(&[("hada_w1_a", randn(&[8, 8], 1)), ("hada_w1_b", randn(&[8, 8], 2)), ("hada_w2_a", randn(&[8, 4], 3)), ("hada_w2_b", randn(&[4, 72], 4))]),
        &["loha-as-lokr.safetensors", "LoHa", &format!("{m}.hada_w2_b"), "[4, 72]"],
    );
    // A LoKr with no second half.
    refused("half.safetensors", &t(&[("lokr_w1", randn(&[8, 8], 1))]), &["LoKr", &format!("{m}.lokr_w1"), "no second half", "lokr_w2"]);
    // One factor of a half.
    refused("factor.safetensors", &t(&[("lokr_w1", randn(&[8, 8], 1)), ("lokr_w2_a", randn(&[8, 2], 2))]), &[&format!("{m}.lokr_w2_a"), "lokr_w2_b"]);
    // A Tucker core of the wrong rank, for LoCon, LoHa and LoKr.
    refused(
        "mid.safetensors",
        &t(&[("lora_down.weight", randn(&[4, 64, 1, 1], 1)), ("lora_mid.weight", randn(&[3, 3, 3, 3], 2)), ("lora_up.weight", randn(&[64, 4, 1, 1], 3))]),
        &[&format!("{m}.lora_mid.weight"), "[3, 3, 3, 3]", "rank 4"],
    );
    refused(
        "hada-t.safetensors",
        &t(&[
            ("hada_t1", randn(&[4, 4, 3, 3], 1)),
            ("hada_w1_a", randn(&[4, 64], 2)),
            ("hada_w1_b", randn(&[4, 64], 3)),
            ("hada_t2", randn(&[2, 4, 3, 3], 4)),
            ("hada_w2_a", randn(&[4, 64], 5)),
            ("hada_w2_b", randn(&[4, 64], 6)),
        ]),
        &[&format!("{m}.hada_t2"), "[2, 4, 3, 3]", "Tucker core"],
    );
    refused(
        "lokr-t.safetensors",
        &t(&[("lokr_w1", randn(&[8, 8], 1)), ("lokr_t2", randn(&[2, 2, 3, 3], 2)), ("lokr_w2_a", randn(&[4, 8], 3)), ("lokr_w2_b", randn(&[4, 8], 4))]),
        &[&format!("{m}.lokr_t2"), "Tucker core"],
    );
    // Two algorithms in one module; a whole and a factorised first half.
    refused("mixed.safetensors", &t(&[("hada_w1_a", randn(&[8, 2], 1)), ("lokr_w1", randn(&[8, 8], 2))]), &["mixes", "LoHa", "LoKr", &format!("{m}.lokr_w1")]);
    refused(
        "both.safetensors",
        &t(&[("lokr_w1", randn(&[8, 8], 1)), ("lokr_w1_a", randn(&[8, 2], 2)), ("lokr_w1_b", randn(&[2, 8], 3)), ("lokr_w2", randn(&[8, 8, 3, 3], 4))]),
        &["both whole", &format!("{m}.lokr_w1")],
    );
    // A DoRA magnitude of neither layout, and one with nothing to scale.
    refused(
        "dora.safetensors",
        &t(&[("lora_down.weight", randn(&[4, 576], 1)), ("lora_up.weight", randn(&[64, 4], 2)), ("dora_scale", randn(&[8, 8], 3))]),
        &[&format!("{m}.dora_scale"), "[8, 8]"],
    );
    refused("alone.safetensors", &t(&[("dora_scale", randn(&[64, 1], 1))]), &[&format!("{m}.dora_scale"), "no weights"]);
}

#[test]
fn adapters_that_fit_no_layer_name_the_layer_and_tensors() {
    let pipe = tiny();
    // A LoKr whose Kronecker product is 64 × 64 on a 3×3 convolution that needs 64 × 64 × 3 × 3.
    let m = "lora_unet_down_blocks_0_resnets_0_conv1";
    let mut t = BTreeMap::new();
    t.insert(format!("{m}.lokr_w1"), randn(&[8, 8], 1));
    t.insert(format!("{m}.lokr_w2"), randn(&[8, 8], 2));
    let lora = LoraFile::from_bytes(Path::new("flat.safetensors"), &bytes_of(&t)).unwrap();
    let err = LoraStack::resolve(&pipe, &[(&lora, 1.0)]).unwrap_err().to_string();
    for n in ["unet.down_blocks.0.resnets.0.conv1", "3×3 kernel", &format!("{m}.lokr_w2"), "[64, 64]"] {
        assert!(err.contains(n), "{err:?} should mention {n:?}");
    }
    // A DoRA magnitude for another width.
    let m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let mut t = BTreeMap::new();
    t.insert(format!("{m}.lora_down.weight"), randn(&[4, 64], 1));
    t.insert(format!("{m}.lora_up.weight"), randn(&[64, 4], 2));
    t.insert(format!("{m}.dora_scale"), randn(&[32, 1], 3));
    let lora = LoraFile::from_bytes(Path::new("dora.safetensors"), &bytes_of(&t)).unwrap();
    let err = LoraStack::resolve(&pipe, &[(&lora, 1.0)]).unwrap_err().to_string();
    assert!(err.contains("64 output channels") && err.contains("32 values"), "{err}");
}

#[test]
fn ia3_glora_and_oft_are_refused_by_name_with_the_reason() {
    let m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    for (suffix, shape, needle) in [
        ("on_input", vec![1], "IA³"),
        ("weight", vec![64], "IA³"),
        ("a1.weight", vec![4, 64], "GLoRA"),
        ("oft_blocks", vec![4, 16, 16], "OFT"),
        ("w_norm", vec![64], "norm-layer"),
    ] {
        let mut t = BTreeMap::new();
        t.insert(format!("{m}.{suffix}"), randn(&shape, 1));
        refused("x.safetensors", &t, &[needle, "cannot apply", &format!("{m}.{suffix}")]);
    }
    // LyCORIS tensors after a dotted name: refused with the naming loragate takes.
    let mut t = BTreeMap::new();
    t.insert("base_model.model.down_blocks.0.resnets.0.conv1.hada_w1_a".to_string(), randn(&[64, 4], 1));
    refused("peft-loha.safetensors", &t, &["LoHa", "kohya/LyCORIS naming"]);
}

/// `loragate ARGS` from the repository root; (exit code, stdout + stderr).
fn loragate(args: &[&str]) -> (i32, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_loragate"))
        .args(args)
        .current_dir(common::repo())
        .env_remove("GITHUB_STEP_SUMMARY")
        .output()
        .unwrap();
    (o.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

/// The portrait suite's stacked case with each adapter in place of its zorb LoRA (stacked with
/// the sticker LoRA, each alone, the pair): it runs end to end with every tensor applied. A random
/// adapter is no good zorb, so checks may fail (exit 1); a refusal (exit 2) or a crash may not.
/// Then `generate` with one stacked at a weight, and `inspect` through the binary.
#[test]
fn the_portrait_suite_runs_with_each_adapter_swapped_in() {
    let tmp = std::env::temp_dir().join(format!("loragate-adapters-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let cache = tmp.join("cache");
    for name in ADAPTERS {
        let file = adapter(name);
        let out = tmp.join(name);
        let (code, text) = loragate(&[
            "suite",
            "suites/portrait.yaml",
            "--ci",
            "--case",
            "stacked",
            "--lora",
            &format!("zorb={}", file.display()),
            "--out",
            out.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ]);
        assert!(code == 0 || code == 1, "{name}: exit {code}\n{text}");
        let junit = std::fs::read_to_string(out.join("junit.xml")).unwrap();
        let n = LoraFile::load(&file).unwrap().tensor_count;
        assert!(junit.contains(&format!("{name}.safetensors: {n} of {n} tensors applied")), "{name}: {junit}");
        assert!(text.contains("PASS   stacked applied"), "{name}: {text}");
    }
    let png = tmp.join("lokr.png");
    let lokr = format!("{}:0.8", adapter("lokr-factored").display());
    let dora = format!("{}:0.5", adapter("dora").display());
    let (code, text) = loragate(&["generate", "zorb, large, in the center, sky background", "--lora", &lokr, "--lora", &dora, "--steps", "4", "-o", png.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(png.exists(), "{text}");
    let (code, text) = loragate(&["inspect", adapter("lokr-factored").to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("LoKr (Kronecker product)") && text.contains("factors:"), "{text}");
}

/// SDXL files name UNet modules the SGM way (`input_blocks_4_1_…`) and the second text encoder
/// `lora_te2_`; LyCORIS algorithms bind through the same names. The model is built without
/// weights (a recorder): only its layer names and shapes matter here.
#[test]
fn lycoris_modules_bind_to_sdxl_by_sgm_names_and_te2() {
    use loragate::model::adapters::AdapterTargets;
    use loragate::model::params::{Params, WeightStore};
    use loragate::model::text_encoder::{TextConfig, TextEncoder};
    use loragate::model::unet::{UNet, UNetConfig};
    use std::cell::RefCell;
    let cfg = UNetConfig::sdxl();
    let store = WeightStore::recorder(&Device::Cpu);
    let (unet, te2) = (RefCell::new(AdapterTargets::default()), RefCell::new(AdapterTargets::default()));
    UNet::load(&Params::root(&store, &unet), &cfg).unwrap();
    TextEncoder::load(&Params::root(&store, &te2), &TextConfig::sdxl_bigg(), true).unwrap();
    let mut targets = AdapterTargets::default();
    targets.extend_prefixed("unet", &unet.into_inner());
    targets.extend_prefixed("text_encoder_2", &te2.into_inner());
    let mut t = BTreeMap::new();
    // LoKr on cross-attention keys (2048 → 640): w1 [8, 16] whole ⊗ w2 [80, 128] of rank 4.
    let k = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k";
    t.insert(format!("{k}.lokr_w1"), randn(&[8, 16], 1));
    t.insert(format!("{k}.lokr_w2_a"), randn(&[80, 4], 2));
    t.insert(format!("{k}.lokr_w2_b"), randn(&[4, 128], 3));
    // LoCon with a Tucker core on the first ResNet's 3×3 conv1 (LDM `in_layers.2`).
    let c = "lora_unet_input_blocks_1_0_in_layers_2";
    t.insert(format!("{c}.lora_down.weight"), randn(&[2, 320, 1, 1], 4));
    t.insert(format!("{c}.lora_mid.weight"), randn(&[2, 2, 3, 3], 5));
    t.insert(format!("{c}.lora_up.weight"), randn(&[320, 2, 1, 1], 6));
    // LoHa with DoRA on the second text encoder's queries.
    let q = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj";
    for (n, s) in [("hada_w1_a", [1280, 2]), ("hada_w1_b", [2, 1280]), ("hada_w2_a", [1280, 2]), ("hada_w2_b", [2, 1280])] {
        t.insert(format!("{q}.{n}"), randn(&s, 7));
    }
    t.insert(format!("{q}.dora_scale"), randn(&[1280, 1], 8));
    let lora = LoraFile::from_bytes(Path::new("sdxl-lycoris.safetensors"), &bytes_of(&t)).unwrap();
    assert_eq!(loragate::lora::apply::probable_family(&lora), Some(loragate::model::Family::Sdxl));
    let index = loragate::lora::apply::TargetIndex::new(&targets, Some(&cfg));
    let bound = loragate::lora::apply::resolve_lora(&lora, &index, "sd_xl_base_1.0", loragate::model::Family::Sdxl).unwrap();
    let mut got: Vec<&str> = bound.modules.iter().map(|m| m.target.as_str()).collect();
    got.sort();
    assert_eq!(
        got,
        [
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
            "unet.down_blocks.0.resnets.0.conv1",
            "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        ]
    );
}
