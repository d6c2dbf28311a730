//! The suite harness driven through the real binary: a good setup passes; a LoRA that does
//! nothing, a LoRA that breaks backgrounds, a word-order-sensitive LoRA and a changed baseline
//! each fail the check they should; bad suites fail before anything is generated; reports are
//! valid and stable; the committed portrait suite passes against its committed baselines.
//!
//! Fixture projects and LoRAs are built in code (as insta's own tests do). Suites use 128 px,
//! few steps and one seed to keep the run short.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;
use common::junit_schema::validate;
use loragate::lora::export::{ExportModule, write};
use loragate::lora::{Component, KeyStyle, LoraFile};
use loragate::model::noise::{Rng, randn};
use loragate::tensors::SaveDtype;

/// A throwaway project folder with its own cache.
struct Project {
    dir: PathBuf,
}

impl Project {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("loragate-suite-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("suites")).unwrap();
        std::fs::create_dir_all(dir.join("loras")).unwrap();
        // Marks the project root (baselines/ and out/ go here).
        std::fs::write(dir.join("Cargo.toml"), "").unwrap();
        Project { dir }
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_loragate"))
            .args(args)
            .current_dir(&self.dir)
            .env_remove("CI")
            .env_remove("GITHUB_STEP_SUMMARY")
            .env("LORAGATE_CACHE", self.dir.join(".cache"))
            .output()
            .unwrap()
    }

    fn junit(&self, suite: &str) -> String {
        std::fs::read_to_string(self.dir.join("out").join(suite).join("junit.xml")).unwrap()
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// The status line of one check in the console table, e.g. `FAIL   case   effect   ...`.
fn status_of(out: &str, case: &str, check: &str) -> Option<String> {
    out.lines().find_map(|l| {
        let parts: Vec<&str> = l.split_whitespace().collect();
        (parts.len() >= 3 && parts[1] == case && parts[2] == check).then(|| parts[0].to_string())
    })
}

fn zorb() -> PathBuf {
    common::shared_loras().join("zorb.kohya.safetensors")
}

/// A LoRA with the zorb file's modules and every up matrix zero: it applies fully and does
/// nothing.
fn write_noop_lora(path: &Path) {
    let pipe = common::tiny();
    let z = LoraFile::load(&zorb()).unwrap();
    let index = loragate::lora::resolve::TargetIndex::new(pipe.targets(), Some(&pipe.unet.config));
    let modules: Vec<ExportModule> = z
        .modules
        .iter()
        .map(|m| {
            let (key, _) = index.find(m.component, &m.name).unwrap();
            ExportModule { component: Component::Unet, path: key.strip_prefix("unet.").unwrap().into(), down: m.down.clone(), up: m.up.zeros_like().unwrap(), alpha: 4.0 }
        })
        .collect();
    write(path, &modules, KeyStyle::Kohya, &BTreeMap::new(), SaveDtype::F32).unwrap();
}

/// Random strong patches on every self-attention output: the object survives, the scene and
/// background melt.
fn write_background_breaker(path: &Path) {
    let pipe = common::tiny();
    let mut rng = Rng::new(7);
    let modules: Vec<ExportModule> = pipe
        .targets()
        .iter()
        .filter_map(|(k, l)| {
            let p = k.strip_prefix("unet.")?;
            p.ends_with("attn1.to_out.0").then(|| {
                let (i, o) = (l.kind.in_dim(), l.kind.out_dim());
                ExportModule {
                    component: Component::Unet,
                    path: p.into(),
                    down: (randn(&mut rng, &[4, i], &Device::Cpu).unwrap() * (4.0 / (i as f64).sqrt())).unwrap(),
                    up: (randn(&mut rng, &[o, 4], &Device::Cpu).unwrap() * 0.5).unwrap(),
                    alpha: 4.0,
                }
            })
        })
        .collect();
    write(path, &modules, KeyStyle::Kohya, &BTreeMap::new(), SaveDtype::F32).unwrap();
}

fn suite_yaml(name: &str, lora: &Path, extra_cases: &str) -> String {
    format!(
        r#"name: {name}
loras:
  - name: subject
    file: {}
    trigger: zorb
defaults:
  seeds: [0]
  steps: 8
  size: 128x128
  adapters: [subject]
thresholds:
  clip_floor: 0.3
  control_drop: 0.05
cases:
  - name: center
    prompt: "red circle, large, in the center, sky background"
{extra_cases}"#,
        lora.display()
    )
}

#[test]
fn a_good_setup_passes_after_its_baselines_are_accepted_and_reruns_generate_nothing() {
    let p = Project::new("good");
    let suite = p.write("suites/good.yaml", &suite_yaml("good", &zorb(), ""));
    // First run: no baselines yet, so the baseline check fails and images become pending.
    let first = p.run(&["suite", suite.to_str().unwrap()]);
    let out = text(&first);
    assert_eq!(code(&first), 1, "{out}");
    assert_eq!(status_of(&out, "center", "baseline").as_deref(), Some("FAIL"), "{out}");
    for check in ["applied", "sanity", "clip", "control", "effect"] {
        assert_eq!(status_of(&out, "center", check).as_deref(), Some("PASS"), "{check}: {out}");
    }
    assert!(p.dir.join("baselines/good/cpu-f32/center/main-s0.new.png").is_file());
    let review = p.run(&["baseline", "review"]);
    assert!(text(&review).contains("good/center/main-s0"), "{}", text(&review));
    let accept = p.run(&["baseline", "accept", "good"]);
    assert!(text(&accept).contains("1 accepted"), "{}", text(&accept));
    assert!(p.dir.join("baselines/good/cpu-f32/center/main-s0.png").is_file());
    assert!(p.dir.join("baselines/good/cpu-f32/center/main-s0.json").is_file());

    // `good.yaml` is found under suites/; the second run is all cached and passes.
    let second = p.run(&["suite", "good.yaml"]);
    let out = text(&second);
    assert_eq!(code(&second), 0, "{out}");
    assert!(out.contains("(0 generated, 2 cached)"), "{out}");
    for f in ["junit.xml", "report.html", "summary.md", "images/center/main-s0.png", "images/center/main-s0.control.png"] {
        assert!(p.dir.join("out/good").join(f).is_file(), "{f} missing");
    }
    let junit = p.junit("good");
    assert_eq!(validate(&junit), Vec::<String>::new());
    let markdown = std::fs::read_to_string(p.dir.join("out/good/summary.md")).unwrap();
    let mut settings = insta::Settings::clone_current();
    // Timings, float noise in the last digits, and temp paths change from run to run.
    settings.add_filter(r#"time="[0-9.]+""#, r#"time="[time]""#);
    settings.add_filter(r"-?\d+\.\d{3,}", "[num]");
    settings.add_filter(r"\d+\.\d+/255", "[num]/255");
    settings.add_filter(r#"/[^\s"<>]*loragate-suite-good-\d+"#, "[project]");
    settings.bind(|| {
        insta::assert_snapshot!("good_junit", junit);
        insta::assert_snapshot!("good_summary", markdown);
    });
    let html = std::fs::read_to_string(p.dir.join("out/good/report.html")).unwrap();
    assert!(html.contains("data:image/png;base64,") && !html.contains("src=\"http"), "the report must be self-contained");
}

/// A case without the trigger word that the LoRA must leave alone.
const UNTOUCHED_CASE: &str = r#"  - name: untouched
    prompt: "blue square, small, on the left, white background"
    thresholds: { leak: 0.01 }
"#;

#[test]
fn a_lora_that_does_nothing_fails_the_effect_check() {
    let p = Project::new("noop");
    let lora = p.dir.join("loras/noop.safetensors");
    write_noop_lora(&lora);
    // The suite names the zorb LoRA; `--lora` swaps in the file under test.
    let suite = p.write("suites/noop.yaml", &suite_yaml("noop", &zorb(), UNTOUCHED_CASE));
    let swap = format!("subject={}", lora.display());
    let o = p.run(&["suite", suite.to_str().unwrap(), "--lora", &swap]);
    let out = text(&o);
    assert_eq!(code(&o), 1, "{out}");
    assert_eq!(status_of(&out, "center", "applied").as_deref(), Some("PASS"), "{out}");
    assert_eq!(status_of(&out, "center", "effect").as_deref(), Some("FAIL"), "{out}");
    // Doing nothing is right where the LoRA should stay out.
    assert_eq!(status_of(&out, "untouched", "leak").as_deref(), Some("PASS"), "{out}");
    assert_eq!(status_of(&out, "untouched", "effect"), None, "a leak case has no effect check: {out}");
    let junit = p.junit("noop");
    assert!(junit.contains("it does next to nothing"), "{junit}");
    assert_eq!(validate(&junit), Vec::<String>::new());
    assert!(!p.dir.join("baselines").exists(), "a run with a swapped LoRA writes no pending baselines");
    // A name the suite does not have is a usage error.
    let o = p.run(&["suite", suite.to_str().unwrap(), "--lora", &format!("nobody={}", lora.display())]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(text(&o).contains("no LoRA named `nobody` (it has: subject)"), "{}", text(&o));
}

#[test]
fn a_lora_that_breaks_backgrounds_fails_against_its_control() {
    let p = Project::new("bg");
    let lora = p.dir.join("loras/bg.safetensors");
    write_background_breaker(&lora);
    let suite = p.write("suites/bg.yaml", &suite_yaml("bg", &lora, UNTOUCHED_CASE));
    let o = p.run(&["suite", suite.to_str().unwrap()]);
    let out = text(&o);
    assert_eq!(code(&o), 1, "{out}");
    assert_eq!(status_of(&out, "center", "control").as_deref(), Some("FAIL"), "{out}");
    assert_eq!(status_of(&out, "center", "effect").as_deref(), Some("PASS"), "{out}");
    // It melts scenes whatever the prompt: it leaks into prompts without the trigger.
    assert_eq!(status_of(&out, "untouched", "leak").as_deref(), Some("FAIL"), "{out}");
}

#[test]
fn a_changed_baseline_fails_and_ci_writes_nothing() {
    let p = Project::new("changed");
    let suite = p.write("suites/changed.yaml", &suite_yaml("changed", &zorb(), ""));
    p.run(&["suite", suite.to_str().unwrap()]);
    p.run(&["baseline", "accept"]);
    // Someone's LoRA drifted: paint a block into the stored baseline.
    let png = p.dir.join("baselines/changed/cpu-f32/center/main-s0.png");
    let mut img = image::open(&png).unwrap().to_rgb8();
    for x in 0..64 {
        for y in 0..64 {
            img.put_pixel(x, y, image::Rgb([0, 255, 0]));
        }
    }
    img.save(&png).unwrap();
    let ci = p.run(&["suite", suite.to_str().unwrap(), "--ci"]);
    let out = text(&ci);
    assert_eq!(code(&ci), 1, "{out}");
    assert_eq!(status_of(&out, "center", "baseline").as_deref(), Some("FAIL"), "{out}");
    assert!(!png.with_file_name("main-s0.new.png").exists(), "CI must not write under baselines/");
    // Locally the new image becomes pending, and rejecting it keeps the stored baseline.
    let local = p.run(&["suite", suite.to_str().unwrap()]);
    assert_eq!(code(&local), 1);
    assert!(png.with_file_name("main-s0.new.png").is_file());
    let r = p.run(&["baseline", "reject", "--filter", "center/main"]);
    assert!(text(&r).contains("1 rejected"), "{}", text(&r));
    assert!(!png.with_file_name("main-s0.new.png").exists());
    assert!(png.is_file());
}

#[test]
fn bad_suites_fail_before_generating_with_file_line_column_and_exit_2() {
    let p = Project::new("bad");
    let lora = zorb();
    let cases: &[(&str, String, &str)] = &[
        ("unknown-field", suite_yaml("x", &lora, "    sizez: 128x128\n"), ":17:5: unknown field `sizez`"),
        ("bad-size", suite_yaml("x", &lora, "    size: 130x128\n"), ":17:11: size 130x128 is not a multiple of 8"),
        ("escape", suite_yaml("x", &lora, "  - name: ../evil\n    prompt: a\n"), ":17:11: case name `../evil` contains `..`"),
        ("missing-lora", suite_yaml("x", Path::new("nowhere.safetensors"), ""), ":4:11: LoRA file `nowhere.safetensors` not found"),
        ("wrong-type", suite_yaml("x", &lora, "").replace("steps: 8", "steps: many"), ":8:10: invalid"),
        ("unknown-adapter", suite_yaml("x", &lora, "    adapters: [other]\n"), ":17:16: no LoRA named `other`"),
        ("duplicate", suite_yaml("x", &lora, "  - name: center\n    prompt: b\n"), ":17:11: case name `center` is used twice"),
    ];
    for (name, yaml, needle) in cases {
        let suite = p.write(&format!("suites/{name}.yaml"), yaml);
        let o = p.run(&["suite", suite.to_str().unwrap()]);
        let out = text(&o);
        assert_eq!(code(&o), 2, "{name}: {out}");
        assert!(out.contains(needle), "{name}: expected {needle:?} in {out}");
        assert!(!p.dir.join("out").join("x").exists(), "{name}: nothing may be generated");
    }
    // A model folder that is not there is an environment problem: exit 3.
    let suite = p.write("suites/nomodel.yaml", &suite_yaml("x", &lora, "").replace("defaults:", "models: [./models/sd15]\ndefaults:"));
    let o = p.run(&["suite", suite.to_str().unwrap()]);
    assert_eq!(code(&o), 3, "{}", text(&o));
    assert!(text(&o).contains("model folder not found"), "{}", text(&o));
}

#[test]
fn partitions_cover_the_suite_and_their_junit_files_merge() {
    let p = Project::new("partition");
    let extra = "  - name: left\n    prompt: \"blue square, small, on the left, white background\"\n    adapters: []\n  - name: night\n    prompt: \"yellow triangle, large, at the bottom, night background\"\n    adapters: []\n";
    let suite = p.write("suites/part.yaml", &suite_yaml("part", &zorb(), extra));
    let mut files = Vec::new();
    for n in 1..=2 {
        let o = p.run(&["suite", suite.to_str().unwrap(), "--ci", "--partition", &format!("{n}/2")]);
        assert!(code(&o) <= 1, "{}", text(&o));
        files.push(p.dir.join(format!("out/part/partition-{n}-of-2/junit.xml")));
    }
    let merged = p.dir.join("merged.xml");
    let o = p.run(&["merge-junit", files[0].to_str().unwrap(), files[1].to_str().unwrap(), "-o", merged.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let xml = std::fs::read_to_string(&merged).unwrap();
    assert_eq!(validate(&xml), Vec::<String>::new());
    for case in ["part.center", "part.left", "part.night"] {
        assert!(xml.contains(&format!("classname=\"{case}\"")), "{case} missing from merged JUnit");
    }
    // Each case ran in exactly one partition.
    let p1 = std::fs::read_to_string(&files[0]).unwrap();
    let p2 = std::fs::read_to_string(&files[1]).unwrap();
    for case in ["part.center", "part.left", "part.night"] {
        let needle = format!("classname=\"{case}\"");
        assert!(p1.contains(&needle) ^ p2.contains(&needle), "{case} must be in exactly one partition");
    }
}

#[test]
fn the_json_schema_describes_suite_files() {
    let o = Command::new(env!("CARGO_BIN_EXE_loragate")).arg("schema").output().unwrap();
    assert_eq!(code(&o), 0);
    let schema: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let props = &schema["properties"];
    for field in ["cases", "loras", "defaults", "thresholds", "models", "scorer", "policy"] {
        assert!(props.get(field).is_some(), "schema lacks `{field}`");
    }
    assert_eq!(schema["required"], serde_json::json!(["cases"]));
}

#[test]
fn junit_validator_rejects_what_the_schema_rejects() {
    assert!(validate(r#"<testsuites><testsuite name="a" tests="1"><testcase name="x"/></testsuite></testsuites>"#).is_empty());
    assert!(!validate(r#"<testsuites><testsuite tests="1"><testcase name="x"/></testsuite></testsuites>"#).is_empty());
    assert!(!validate(r#"<testsuites><testsuite name="a" tests="2"><testcase name="x"/></testsuite></testsuites>"#).is_empty());
    assert!(!validate(r#"<testsuites><testsuite name="a" tests="1"><testcase name="x"><properties/></testcase></testsuite></testsuites>"#).is_empty());
    assert!(!validate(r#"<testsuites><testcase name="x"/></testsuites>"#).is_empty());
    assert!(!validate(r#"<testsuites><testsuite name="a" tests="1" time="-1"><testcase name="x"/></testsuite></testsuites>"#).is_empty());
}

/// The main job as CI would run it on a clean clone: the committed portrait suite, its
/// committed LoRA and baselines, every check passing. Generates into a private cache and
/// output folder so the repository's own `out/` is untouched.
#[test]
fn the_portrait_suite_passes_against_its_committed_baselines() {
    let tmp = std::env::temp_dir().join(format!("loragate-portrait-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    // `loragate suite portrait.yaml --ci` from the repository, into `tmp/<out>`.
    let run = |out: &str, extra: &[String]| {
        let o = Command::new(env!("CARGO_BIN_EXE_loragate"))
            .args(["suite", "portrait.yaml", "--ci"])
            .args(extra)
            .arg("--out")
            .arg(tmp.join(out))
            .arg("--cache-dir")
            .arg(tmp.join("cache"))
            .current_dir(common::repo())
            .env_remove("GITHUB_STEP_SUMMARY")
            .output()
            .unwrap();
        (code(&o), text(&o))
    };
    let (status, out) = run("good", &[]);
    assert_eq!(status, 0, "{out}");
    let junit = std::fs::read_to_string(tmp.join("good/junit.xml")).unwrap();
    assert_eq!(validate(&junit), Vec::<String>::new());
    // Every variant and every kind of check is exercised.
    for check in [
        "applied", "sanity", "clip", "control", "effect", "leak", "word-order", "identity", "clip@192x192", "clip/tiny-sticker", "sweep",
        "sweep-zero", "bisect", "baseline",
    ] {
        assert!(junit.contains(&format!("name=\"{check}\"")), "no `{check}` check in the portrait suite");
    }
    assert!(junit.contains("name=\"identity-group/"), "no identity group");
    // The deliberately bad run (training/zorb-bad.yaml) fails the same suite: here its
    // trigger-free case, where it paints over the red circle.
    let bad = common::fixtures().join("loras/zorb-bad.safetensors");
    let (status, out) = run("bad", &["--case".into(), "no-trigger".into(), "--lora".into(), format!("zorb={}", bad.display())]);
    assert_eq!(status, 1, "{out}");
    for check in ["leak", "control", "baseline"] {
        assert_eq!(status_of(&out, "no-trigger", check).as_deref(), Some("FAIL"), "{check}: {out}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A LoRA trained with every caption in one fixed tag order (and too high a learning rate):
/// swapping tags changes what it draws, so the word-order check fails where the committed
/// LoRA passes it.
#[test]
fn a_word_order_sensitive_lora_fails_the_word_order_check() {
    let p = Project::new("order");
    let case = "  - name: swapped\n    prompt: \"zorb, large, on the left, grass background\"\n    word_order: { sample: 3, seed: 2 }\n";
    let run = |name: &str, lora: &Path| {
        let suite = p.write(&format!("suites/{name}.yaml"), &suite_yaml(name, lora, case));
        text(&p.run(&["suite", suite.to_str().unwrap(), "--ci", "--case", "swapped"]))
    };
    let good = run("good", &common::repo().join("assets/loras/zorb-loragate.safetensors"));
    assert_eq!(status_of(&good, "swapped", "word-order").as_deref(), Some("PASS"), "{good}");
    let bad = run("bad", &common::fixtures().join("loras/zorb-fixed-order.safetensors"));
    assert_eq!(status_of(&bad, "swapped", "word-order").as_deref(), Some("FAIL"), "{bad}");
}
