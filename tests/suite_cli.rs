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
        self.run_env(args, &[])
    }

    fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_loragate"));
        c.args(args).current_dir(&self.dir).env_remove("CI").env_remove("GITHUB_STEP_SUMMARY").env("LORAGATE_CACHE", self.dir.join(".cache"));
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
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
    let index = loragate::lora::apply::TargetIndex::new(pipe.targets(), Some(&pipe.unet.config));
    let modules: Vec<ExportModule> = z
        .modules
        .iter()
        .map(|m| {
            let (key, _) = index.find(m.component, &m.name).unwrap();
            let (down, up) = m.low_rank().unwrap();
            ExportModule { component: Component::Unet, path: key.strip_prefix("unet.").unwrap().into(), down: down.clone(), up: up.zeros_like().unwrap(), alpha: 4.0 }
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
    // First run: no baselines yet. New images and measurements are review items, not failures,
    // and are written as pending files.
    let first = p.run(&["suite", suite.to_str().unwrap()]);
    let out = text(&first);
    assert_eq!(code(&first), 0, "{out}");
    assert_eq!(status_of(&out, "center", "baseline").as_deref(), Some("REVIEW"), "{out}");
    assert_eq!(status_of(&out, "center", "regression").as_deref(), Some("REVIEW"), "{out}");
    for check in ["applied", "sanity", "clip", "per-seed", "control", "effect"] {
        assert_eq!(status_of(&out, "center", check).as_deref(), Some("PASS"), "{check}: {out}");
    }
    assert!(p.dir.join("baselines/good/cpu-f32/center/main-s0.new.png").is_file());
    assert!(p.dir.join("baselines/good/cpu-f32/center/scores.new.json").is_file());
    // The review gate is red while anything waits for a person.
    let gate = p.run(&["review"]);
    assert_eq!(code(&gate), 1, "{}", text(&gate));
    assert!(text(&gate).contains("**center · baseline**") && text(&gate).contains("items to review"), "{}", text(&gate));
    let review = p.run(&["baseline", "review"]);
    assert!(text(&review).contains("good/center/main-s0"), "{}", text(&review));
    assert!(text(&review).contains("good/center/scores"), "{}", text(&review));
    // The suite file names its baselines.
    let accept = p.run(&["baseline", "accept", "suites/good.yaml"]);
    assert!(text(&accept).contains("2 accepted"), "{}", text(&accept));
    assert!(p.dir.join("baselines/good/cpu-f32/center/main-s0.png").is_file());
    assert!(p.dir.join("baselines/good/cpu-f32/center/main-s0.json").is_file());
    assert!(p.dir.join("baselines/good/cpu-f32/center/scores.json").is_file());

    // `good.yaml` is found under suites/; the second run is all cached and passes, the
    // measurements equal the accepted ones.
    let second = p.run(&["suite", "good.yaml"]);
    let out = text(&second);
    assert_eq!(code(&second), 0, "{out}");
    assert!(out.contains("(0 generated, 2 cached)"), "{out}");
    assert_eq!(status_of(&out, "center", "regression").as_deref(), Some("PASS"), "{out}");
    assert_eq!(status_of(&out, "center", "baseline").as_deref(), Some("PASS"), "{out}");
    assert!(!p.dir.join("baselines/good/cpu-f32/center/scores.new.json").exists(), "nothing left to review");
    let gate = p.run(&["review", "out/good"]);
    assert_eq!(code(&gate), 0, "{}", text(&gate));
    assert!(text(&gate).contains("review: nothing to review"), "{}", text(&gate));
    let nothing = p.run(&["review", "suites"]);
    assert_eq!(code(&nothing), 2, "no outcome.json is a usage error: {}", text(&nothing));
    for f in ["junit.xml", "report.html", "summary.md", "images/center/main-s0.png", "images/center/main-s0.control.png"] {
        assert!(p.dir.join("out/good").join(f).is_file(), "{f} missing");
    }
    let junit = p.junit("good");
    assert_eq!(validate(&junit), Vec::<String>::new());
    let markdown = std::fs::read_to_string(p.dir.join("out/good/summary.md")).unwrap();
    let mut settings = insta::Settings::clone_current();
    // Timings, float noise in the last digits, and temp paths change from run to run.
    settings.add_filter(r#"time="[0-9.]+""#, r#"time="[time]""#);
    settings.add_filter(r"[-+]?\d+\.\d{3,}", "[num]");
    settings.add_filter(r"\d+\.\d+/255", "[num]/255");
    settings.add_filter(r#"/[^\s"<>]*loragate-suite-good-\d+"#, "[project]");
    settings.bind(|| {
        insta::assert_snapshot!("good_junit", junit);
        insta::assert_snapshot!("good_summary", markdown);
    });
    let html = std::fs::read_to_string(p.dir.join("out/good/report.html")).unwrap();
    assert!(html.contains("data:image/png;base64,") && !html.contains("src=\"http"), "the report must be self-contained");
    // The report's data URIs are the image files' bytes (each image is encoded once).
    let png = std::fs::read(p.dir.join("out/good/images/center/main-s0.png")).unwrap();
    use base64::Engine;
    assert!(html.contains(&base64::engine::general_purpose::STANDARD.encode(&png)), "the report embeds the written image");

    // Embeddings are cached beside the images (the re-run embedded nothing); damaged cache
    // files are misses, not wrong scores.
    let embeddings: Vec<PathBuf> = walk(&p.dir.join(".cache/embeddings"));
    assert!(embeddings.len() >= 3, "2 images and a text embedded: {embeddings:?}");
    for f in &embeddings {
        std::fs::write(f, [0x3fu8; 512]).unwrap();
    }
    let third = p.run(&["suite", "good.yaml", "--ci"]);
    let out = text(&third);
    assert_eq!(code(&third), 0, "{out}");
    for check in ["clip", "control", "regression", "baseline"] {
        assert_eq!(status_of(&out, "center", check).as_deref(), Some("PASS"), "{check}: {out}");
    }
    assert!(std::fs::read(&embeddings[0]).unwrap() != [0x3fu8; 512], "a damaged entry is rewritten");
}

/// A LoRA's character sheet: every image made with the LoRA and its trigger is scored for
/// identity against it, in every case and every prompt of a matrix, and the scores are kept
/// for `regression`; a prompt without the trigger is not scored.
#[test]
fn a_loras_references_score_identity_on_every_prompt_with_its_trigger() {
    let p = Project::new("sheet");
    let refs = p.dir.join("suites/sheet");
    std::fs::create_dir_all(&refs).unwrap();
    for (i, prompt) in ["zorb, large, in the center, sky background", "zorb, small, on the left, grass background"].iter().enumerate() {
        let o = p.run(&["world", "render", prompt, "-o", refs.join(format!("{i}.png")).to_str().unwrap()]);
        assert_eq!(code(&o), 0, "{}", text(&o));
    }
    let cases = "  - name: grid\n    prompt: \"zorb, {size}, sky background\"\n    matrix: { size: [small, large] }\n";
    let yaml = suite_yaml("sheet", &zorb(), cases).replace("    trigger: zorb\n", "    trigger: zorb\n    references: [sheet/]\n");
    let suite = p.write("suites/sheet.yaml", &yaml);
    let o = p.run(&["suite", suite.to_str().unwrap()]);
    let out = text(&o);
    assert!(code(&o) <= 1, "{out}");
    assert!(status_of(&out, "grid", "identity").is_some(), "the matrix is scored for identity: {out}");
    assert!(status_of(&out, "center", "identity").is_none(), "no trigger, no identity: {out}");
    let scores: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p.dir.join("baselines/sheet/cpu-f32/grid/scores.new.json")).unwrap()).unwrap();
    let identity: Vec<&serde_json::Value> = scores["measurements"].as_array().unwrap().iter().filter(|m| m["metric"] == "identity").collect();
    assert_eq!(identity.len(), 2, "one per prompt and seed: {scores}");
    assert!(p.dir.join("out/sheet/report.html").is_file());
    // A reference folder without images is refused before anything runs.
    std::fs::create_dir_all(p.dir.join("suites/empty")).unwrap();
    let bad = p.write("suites/bad.yaml", &yaml.replace("[sheet/]", "[empty/]").replace("name: sheet", "name: bad"));
    let o = p.run(&["suite", bad.to_str().unwrap()]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(text(&o).contains("reference folder `empty/` has no images"), "{}", text(&o));
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

/// Rewrites a stored baseline image as another machine would have made it: other pixels,
/// with metadata that matches them and the same inputs.
fn repaint_baseline(png: &Path) {
    let mut img = image::open(png).unwrap().to_rgb8();
    for x in 0..64 {
        for y in 0..64 {
            img.put_pixel(x, y, image::Rgb([0, 255, 0]));
        }
    }
    img.save(png).unwrap();
    let json = png.with_extension("json");
    let mut meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    meta["pixels"] = serde_json::Value::String(loragate::baseline::pixel_hash(&img));
    std::fs::write(&json, serde_json::to_string_pretty(&meta).unwrap()).unwrap();
}

#[test]
fn pixels_that_move_while_the_inputs_stay_fail_and_ci_writes_nothing() {
    let p = Project::new("changed");
    let suite = p.write("suites/changed.yaml", &suite_yaml("changed", &zorb(), ""));
    p.run(&["suite", suite.to_str().unwrap()]);
    p.run(&["baseline", "accept"]);
    let png = p.dir.join("baselines/changed/cpu-f32/center/main-s0.png");
    repaint_baseline(&png);
    // GitHub sets CI=true: nothing under baselines/ may be written.
    let ci = p.run_env(&["suite", suite.to_str().unwrap()], &[("CI", "true")]);
    let out = text(&ci);
    assert_eq!(code(&ci), 1, "{out}");
    assert_eq!(status_of(&out, "center", "baseline").as_deref(), Some("FAIL"), "{out}");
    assert!(p.junit("changed").contains("the code or the machine moved pixels"), "{}", p.junit("changed"));
    assert!(!png.with_file_name("main-s0.new.png").exists(), "CI must not write under baselines/");
    // Locally the new image becomes pending, and rejecting it keeps the stored baseline.
    let local = p.run(&["suite", suite.to_str().unwrap()]);
    assert_eq!(code(&local), 1);
    assert!(png.with_file_name("main-s0.new.png").is_file());
    let r = p.run(&["baseline", "reject", "--filter", "center/main"]);
    assert!(text(&r).contains("1 rejected"), "{}", text(&r));
    assert!(!png.with_file_name("main-s0.new.png").exists());
    assert!(png.is_file());
    // `always` writes straight over the baseline.
    let always = p.run(&["suite", suite.to_str().unwrap(), "--update-baselines", "always"]);
    assert_eq!(code(&always), 1, "the run still reports what it found: {}", text(&always));
    assert!(text(&always).contains("written over the baselines"), "{}", text(&always));
    let again = p.run(&["suite", suite.to_str().unwrap(), "--ci"]);
    assert_eq!(code(&again), 0, "{}", text(&again));
}

#[test]
fn a_corrupt_baseline_fails_its_own_check_and_the_run_goes_on() {
    let p = Project::new("corrupt");
    let extra = "  - name: other\n    prompt: \"blue square, small, on the left, white background\"\n    adapters: []\n";
    let suite = p.write("suites/corrupt.yaml", &suite_yaml("corrupt", &zorb(), extra));
    p.run(&["suite", suite.to_str().unwrap()]);
    p.run(&["baseline", "accept"]);
    let png = p.dir.join("baselines/corrupt/cpu-f32/center/main-s0.png");
    std::fs::write(&png, b"not a png at all").unwrap();
    // A baseline painted over without its metadata: the pair no longer belongs together.
    let other = p.dir.join("baselines/corrupt/cpu-f32/other/main-s0.png");
    let mut img = image::open(&other).unwrap().to_rgb8();
    img.put_pixel(0, 0, image::Rgb([1, 2, 3]));
    img.save(&other).unwrap();
    let o = p.run(&["suite", suite.to_str().unwrap(), "--ci"]);
    let out = text(&o);
    assert_eq!(code(&o), 1, "a broken baseline is a failed check, not a broken run: {out}");
    assert_eq!(status_of(&out, "center", "baseline").as_deref(), Some("FAIL"), "{out}");
    assert_eq!(status_of(&out, "center", "clip").as_deref(), Some("PASS"), "the other checks still ran: {out}");
    assert_eq!(status_of(&out, "other", "baseline").as_deref(), Some("FAIL"), "{out}");
    let junit = p.junit("corrupt");
    assert!(junit.contains("center/main-s0.png"), "the file is named: {junit}");
    assert!(junit.contains("the pair was changed separately"), "{junit}");
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
        (
            "no-training-set",
            suite_yaml("x", &lora, "").replace("    trigger: zorb\n", "    trigger: zorb\n    training_set: nowhere/\n"),
            ":6:19: training set `nowhere/` not found",
        ),
        ("case-memorization", suite_yaml("x", &lora, "    thresholds: { memorization: 0.5 }\n"), ":15:1: case `center` sets `memorization` thresholds"),
        ("memorization-range", suite_yaml("x", &lora, "").replace("  control_drop: 0.05\n", "  control_drop: 0.05\n  memorization: 1.5\n"), ":1:1: threshold `memorization` is 1.5"),
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
    // A suite file that is not text is a bad suite (exit 2), not an I/O failure.
    let binary = p.dir.join("suites/binary.yaml");
    std::fs::write(&binary, b"name: x\ncases:\n  - name: a\n    prompt: \"\xff\xfe\"\n").unwrap();
    let o = p.run(&["suite", binary.to_str().unwrap()]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(text(&o).contains("binary.yaml:4:14: the suite file is not UTF-8 text"), "{}", text(&o));
    // A corrupt reference image stops the run before anything is generated.
    p.write("suites/refs/broken.png", "not an image");
    let suite = p.write("suites/badref.yaml", &suite_yaml("x", &lora, "    references: [refs/broken.png]\n"));
    let o = p.run(&["suite", suite.to_str().unwrap()]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(text(&o).contains(":17:18: reference image `refs/broken.png` cannot be read"), "{}", text(&o));
    assert!(!p.dir.join(".cache").exists(), "nothing may be generated");
    // A filter that selects nothing is an error, as nextest's "no tests to run".
    let suite = p.write("suites/good.yaml", &suite_yaml("x", &lora, ""));
    let o = p.run(&["suite", suite.to_str().unwrap(), "--case", "nothing-like-this"]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(text(&o).contains("no checks to run: no case of suite `x` matches --case `nothing-like-this` (cases: center)"), "{}", text(&o));
}

/// Model labels become file names: a path with `../` must not make loragate write outside the
/// project's `out/` and `baselines/`.
#[test]
fn hostile_model_paths_stay_inside_the_project() {
    let p = Project::new("hostile");
    // A copy of tiny-sd outside the project, reached by a path full of `..`.
    let outside = std::env::temp_dir().join(format!("loragate-evil-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&outside);
    let evil = outside.join("evil");
    copy_dir(&common::repo().join("assets/tinyworld/tiny-sd"), &evil);
    let up = "../".repeat(p.dir.join("suites").components().count());
    let hostile = format!("{up}{}", evil.display().to_string().trim_start_matches('/'));
    let yaml = suite_yaml("hostile", &zorb(), "").replace("  - name: center\n", &format!("  - name: center\n    models: [tiny, \"{hostile}\"]\n"));
    let suite = p.write("suites/hostile.yaml", &yaml);
    let o = p.run(&["suite", suite.to_str().unwrap()]);
    assert!(code(&o) <= 1, "{}", text(&o));
    let written: Vec<PathBuf> = walk(&outside).into_iter().filter(|f| f.extension().is_some_and(|e| e == "png")).collect();
    assert!(written.is_empty(), "files written outside the project: {written:?}");
    // The label is the folder's name plus a hash of the path, inside the case's folder.
    let case_dir = p.dir.join("baselines/hostile/cpu-f32/center");
    let names: Vec<String> = std::fs::read_dir(&case_dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().any(|n| n.starts_with("evil-") && n.ends_with("-s0.new.png")), "{names:?}");
    assert!(names.iter().any(|n| n == "tiny-s0.new.png"), "{names:?}");
    let _ = std::fs::remove_dir_all(&outside);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn partitions_cover_the_suite_and_their_junit_files_merge() {
    let p = Project::new("partition");
    let extra = "  - name: left\n    prompt: \"blue square, small, on the left, white background\"\n    adapters: []\n  - name: night\n    prompt: \"yellow triangle, large, at the bottom, night background\"\n    adapters: []\n";
    let suite = p.write("suites/part.yaml", &suite_yaml("part", &zorb(), extra));
    let mut files = Vec::new();
    for n in 1..=2 {
        // A partition of a small suite may be empty: `--no-checks warn` says so and passes.
        let o = p.run(&["suite", suite.to_str().unwrap(), "--ci", "--no-checks", "warn", "--partition", &format!("{n}/2")]);
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
    // The partitions' reports merge into one report with every case and its images.
    let dirs: Vec<String> = (1..=2).map(|n| p.dir.join(format!("out/part/partition-{n}-of-2")).display().to_string()).collect();
    let merged_dir = p.dir.join("merged-report");
    let o = p.run(&["merge-report", &dirs[0], &dirs[1], "-o", merged_dir.to_str().unwrap()]);
    assert!(code(&o) <= 1, "{}", text(&o));
    let html = std::fs::read_to_string(merged_dir.join("report.html")).unwrap();
    let junit = std::fs::read_to_string(merged_dir.join("junit.xml")).unwrap();
    assert_eq!(validate(&junit), Vec::<String>::new());
    for case in ["center", "left", "night"] {
        assert!(html.contains(&format!("id=\"case-{case}\"")), "{case} missing from the merged report");
        assert!(junit.contains(&format!("classname=\"part.{case}\"")), "{case} missing from the merged JUnit");
        assert!(merged_dir.join("images").join(case).join("main-s0.png").is_file(), "{case}: image missing");
    }
    assert!(html.matches("data:image/png;base64,").count() >= 3, "the merged report is self-contained");
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
/// committed LoRA and baselines, every check passing (or listed as a known failure). Then the
/// gate's verdicts on other LoRA files: the committed recipe retrained with three other seeds
/// passes (no false alarm), its changed images asking for review; the deliberately bad run
/// fails, naming its checks. Generates into a private cache and output folder so the
/// repository's own `out/` is untouched.
#[test]
fn the_portrait_gate_passes_its_lora_and_a_retrain_and_fails_the_bad_run() {
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
        "applied", "sanity", "clip", "per-seed", "control", "effect", "leak", "word-order", "identity", "diversity", "clip@192x192", "clip/tiny-sticker",
        "clip/zorb+sticker", "stack", "sweep", "sweep-zero", "bisect", "regression", "slice", "identity/accepted", "baseline",
    ] {
        assert!(junit.contains(&format!("name=\"{check}\"")), "no `{check}` check in the portrait suite");
    }
    assert!(junit.contains("name=\"identity-group/"), "no identity group");
    assert!(!out.contains("REVIEW"), "everything is accepted: {out}");
    // The committed LoRA's known weaknesses are reported, not hidden.
    assert_eq!(status_of(&out, "on-white", "per-seed").as_deref(), Some("KNOWN"), "{out}");
    assert_eq!(status_of(&out, "all-cases", "regression").as_deref(), Some("PASS"), "{out}");

    // Retrains with other seeds (training/zorb-seed*.yaml): other pixels, no worse measurements,
    // no slice that lost the character.
    for seed in ["zorb-seed2", "zorb-seed3", "zorb-seed4"] {
        let retrain = common::fixtures().join(format!("loras/{seed}.safetensors"));
        let (status, out) = run(seed, &["--lora".into(), format!("zorb={}", retrain.display())]);
        assert_eq!(status, 0, "{seed}: {out}");
        assert!(!out.lines().any(|l| l.starts_with("FAIL")), "{seed}: {out}");
        let junit = std::fs::read_to_string(tmp.join(seed).join("junit.xml")).unwrap();
        for case in ["training-prompt", "sky-left", "on-grass", "tag-order", "ladder", "sweep", "all-cases"] {
            assert_eq!(status_of(&out, case, "regression").as_deref(), Some("PASS"), "{seed} {case}: {out}");
        }
        assert_eq!(status_of(&out, "all-cases", "slice").as_deref(), Some("PASS"), "{seed}: {out}");
        assert_eq!(status_of(&out, "training-prompt", "baseline").as_deref(), Some("REVIEW"), "{out}");
        assert!(junit.contains(&format!("images differ because their inputs changed (LoRA file changed ({seed}.safetensors))")), "{junit}");
        let summary = std::fs::read_to_string(tmp.join(seed).join("summary.md")).unwrap();
        assert!(summary.contains("### To review") && !summary.contains("### Failed"), "{summary}");
    }

    // The deliberately bad run (training/zorb-bad.yaml) fails, and says where.
    let bad = common::fixtures().join("loras/zorb-bad.safetensors");
    let (status, out) = run("bad", &["--lora".into(), format!("zorb={}", bad.display())]);
    assert_eq!(status, 1, "{out}");
    for (case, check) in [("no-trigger", "leak"), ("at-night", "clip"), ("at-night", "control"), ("sweep", "sweep"), ("all-cases", "regression")] {
        assert_eq!(status_of(&out, case, check).as_deref(), Some("FAIL"), "{case} {check}: {out}");
    }
    let summary = std::fs::read_to_string(tmp.join("bad/summary.md")).unwrap();
    assert!(summary.contains("**all-cases · regression** — significantly worse than accepted against the accepted zorb-loragate.safetensors"), "{summary}");
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

/// One seed in two melts on a white background: the mean over seeds passes the CLIP floor,
/// the per-seed check names the seed.
#[test]
fn a_melted_seed_fails_per_seed_while_the_mean_passes() {
    let p = Project::new("perseed");
    let case = "  - name: on-white\n    prompt: \"zorb, small, on the right, white background\"\n    seeds: [0, 1]\n    steps: 20\n    thresholds: { clip_floor: 0.25, control_drop: 0.3 }\n";
    let yaml = suite_yaml("perseed", &common::repo().join("assets/loras/zorb-loragate.safetensors"), case);
    let suite = p.write("suites/perseed.yaml", &yaml.replace("cases:\n  - name: center\n    prompt: \"red circle, large, in the center, sky background\"\n", "cases:\n"));
    let o = p.run(&["suite", suite.to_str().unwrap(), "--ci"]);
    let out = text(&o);
    assert_eq!(code(&o), 1, "{out}");
    assert_eq!(status_of(&out, "on-white", "clip").as_deref(), Some("PASS"), "the mean passes: {out}");
    assert_eq!(status_of(&out, "on-white", "per-seed").as_deref(), Some("FAIL"), "{out}");
    let junit = p.junit("perseed");
    assert!(junit.contains("main seed 1: CLIP"), "the melted seed is named: {junit}");
}

/// Two objects in one prompt: the base model itself draws other pictures when the tags move.
/// A LoRA that leaves the prompt alone is no more order-sensitive than the base: no alarm,
/// although the similarity is far under the absolute floor.
#[test]
fn a_base_sensitive_prompt_raises_no_word_order_alarm() {
    let p = Project::new("basewo");
    let case = "  - name: two-objects\n    prompt: \"red square, blue circle, night background\"\n    seeds: [0, 1]\n    word_order: { sample: 4, seed: 1 }\n    thresholds: { leak: 0.05 }\n";
    let suite = p.write("suites/basewo.yaml", &suite_yaml("basewo", &common::repo().join("assets/loras/zorb-loragate.safetensors"), case));
    let o = p.run(&["suite", suite.to_str().unwrap(), "--ci", "--case", "two-objects"]);
    let out = text(&o);
    assert_eq!(status_of(&out, "two-objects", "word-order").as_deref(), Some("PASS"), "{out}");
    let junit = p.junit("basewo");
    assert!(junit.contains("the base model is itself order-sensitive here"), "{junit}");
    let min = |key: &str| -> f64 {
        let at = junit.find(&format!("{key}=")).unwrap_or_else(|| panic!("no {key} in {junit}")) + key.len() + 1;
        junit[at..].split_whitespace().next().unwrap().parse().unwrap()
    };
    assert!(min("similarity_min") < 0.85 && min("similarity_min_control") < 0.85, "both under the floor: {junit}");
}

/// A LoRA overtrained on one image draws that image whatever the seed: `diversity` catches it.
#[test]
fn a_collapsed_lora_fails_the_diversity_check() {
    let p = Project::new("collapse");
    let case = "  - name: collapse\n    prompt: \"zorb, small, on the right, white background\"\n    seeds: [0, 1, 2]\n";
    let run = |name: &str, lora: &Path| {
        let suite = p.write(&format!("suites/{name}.yaml"), &suite_yaml(name, lora, case));
        text(&p.run(&["suite", suite.to_str().unwrap(), "--ci", "--case", "collapse"]))
    };
    let good = run("good", &common::repo().join("assets/loras/zorb-loragate.safetensors"));
    assert_eq!(status_of(&good, "collapse", "diversity").as_deref(), Some("PASS"), "{good}");
    let bad = run("bad", &common::fixtures().join("loras/zorb-collapse.safetensors"));
    assert_eq!(status_of(&bad, "collapse", "diversity").as_deref(), Some("FAIL"), "{bad}");
    assert!(p.junit("bad").contains("(collapse)"), "{}", p.junit("bad"));
}

/// The field notes' 0.7/0.3 stack: under the zorb, the sticker look keeps a fraction of its
/// effect. The check fails and names the pair; the report shows the matrix.
#[test]
fn a_stacked_pair_that_interferes_is_reported() {
    let p = Project::new("stack");
    let zorb = common::repo().join("assets/loras/zorb-loragate.safetensors");
    let sticker = common::shared_loras().join("sticker_style.kohya.safetensors");
    let yaml = format!(
        "name: stack\nloras:\n  - name: zorb\n    file: {}\n    trigger: zorb\n  - name: sticker\n    file: {}\ndefaults:\n  seeds: [0, 1]\n  steps: 12\n  size: 128x128\ncases:\n  - name: stacked\n    prompt: \"zorb, large, on the right, sky background\"\n    stack: {{ loras: [zorb, sticker], weights: [0.7, 0.3] }}\n",
        zorb.display(),
        sticker.display()
    );
    let suite = p.write("suites/stack.yaml", &yaml);
    let o = p.run(&["suite", suite.to_str().unwrap(), "--ci"]);
    let out = text(&o);
    assert_eq!(status_of(&out, "stacked", "stack").as_deref(), Some("FAIL"), "{out}");
    for check in ["clip/zorb", "clip/sticker", "clip/zorb+sticker"] {
        assert!(status_of(&out, "stacked", check).is_some(), "{check}: {out}");
    }
    let junit = p.junit("stack");
    assert!(junit.contains("sticker stacked with zorb keeps"), "{junit}");
    let summary = std::fs::read_to_string(p.dir.join("out/stack/summary.md")).unwrap();
    assert!(summary.contains("| | zorb | sticker |") && summary.contains("| **sticker** |"), "{summary}");
    let html = std::fs::read_to_string(p.dir.join("out/stack/report.html")).unwrap();
    assert!(html.contains("<table class=\"matrix\">"), "the report shows the matrix");
}

/// `baseline accept` moves every image with its metadata through a journal: a process killed
/// halfway leaves a store that the next command completes, never an image without its
/// metadata.
#[test]
fn an_accept_killed_midway_is_completed_by_the_next_command() {
    let p = Project::new("killed");
    let extra = "  - name: other\n    prompt: \"blue square, small, on the left, white background\"\n    adapters: []\n";
    let suite = p.write("suites/killed.yaml", &suite_yaml("killed", &zorb(), extra));
    p.run(&["suite", suite.to_str().unwrap()]);
    let store = p.dir.join("baselines/killed/cpu-f32");
    // Die after the first rename: the first image's metadata has moved, its PNG has not.
    let o = p.run_env(&["baseline", "accept"], &[("LORAGATE_FAULT_AFTER_RENAMES", "1")]);
    assert!(!o.status.success(), "the accept must have been killed: {}", text(&o));
    assert!(store.join(".journal.json").is_file(), "the journal survives the crash");
    let half: Vec<PathBuf> = walk(&store).into_iter().filter(|f| f.to_string_lossy().ends_with(".new.png")).collect();
    assert_eq!(half.len(), 2, "nothing but the first metadata file moved: {half:?}");
    // Any command opening the store completes the accept.
    let review = p.run(&["baseline", "review"]);
    assert!(text(&review).contains("completed an interrupted accept"), "{}", text(&review));
    assert!(!store.join(".journal.json").exists());
    for case in ["center", "other"] {
        for f in ["main-s0.png", "main-s0.json", "scores.json"] {
            assert!(store.join(case).join(f).is_file(), "{case}/{f} missing");
        }
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(store.join(case).join("main-s0.json")).unwrap()).unwrap();
        let img = image::open(store.join(case).join("main-s0.png")).unwrap().to_rgb8();
        assert_eq!(meta["pixels"].as_str().unwrap(), loragate::baseline::pixel_hash(&img), "{case}: image and metadata belong together");
    }
    let rerun = p.run(&["suite", suite.to_str().unwrap(), "--ci"]);
    assert_eq!(code(&rerun), 0, "{}", text(&rerun));
}

/// The field notes' hundred prompts, planned without a model: three matrices, 100 prompts,
/// each with its LoRA image and control for four seeds.
#[test]
fn the_hundred_prompt_suite_plans_a_hundred_prompts() {
    let o = Command::new(env!("CARGO_BIN_EXE_loragate")).args(["suite", "hundred.yaml", "--check"]).current_dir(common::repo()).output().unwrap();
    let out = text(&o);
    assert_eq!(code(&o), 0, "{out}");
    assert!(out.contains("hundred: 3 cases, 800 images"), "{out}");
    let variants: usize = out.lines().filter_map(|l| l.split_whitespace().skip_while(|w| *w != "prompts").nth(1)?.parse::<usize>().ok()).sum();
    assert_eq!(variants, 100, "{out}");
}

/// "Is it still the character?" on the field notes' hundred prompts. A retrain of the committed
/// recipe from a dataset with one mislabeled slice (training/zorb-mislabeled.yaml: every zorb on
/// grass is a blue square under the same captions) clears every CLIP floor, and fails through
/// `slice` and `identity/accepted`, both naming the slice, within its case and across the suite.
/// A clean retrain with another seed (zorb-seed2, which once failed this suite on one noisy
/// prompt of a hundred) passes with review items only. (To keep CI short the other clean
/// retrains are held by the portrait test; `scripts/count-false-alarms.sh` runs all three
/// through this suite.)
#[test]
fn a_retrain_that_lost_the_character_on_one_background_fails_the_hundred_prompts_and_a_clean_retrain_passes() {
    let tmp = std::env::temp_dir().join(format!("loragate-hundred-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let run = |out: &str, lora: &str, extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_loragate"))
            .args(["suite", "hundred.yaml", "--ci", "--lora"])
            .arg(format!("zorb={}", common::fixtures().join(format!("loras/{lora}.safetensors")).display()))
            .args(extra)
            .arg("--out")
            .arg(tmp.join(out))
            .arg("--cache-dir")
            .arg(tmp.join("cache"))
            .current_dir(common::repo())
            .env_remove("GITHUB_STEP_SUMMARY")
            .env("COLUMNS", "400")
            .output()
            .unwrap();
        (code(&o), text(&o))
    };
    let (status, out) = run("mislabeled", "zorb-mislabeled", &[]);
    assert_eq!(status, 1, "{out}");
    let line = |case: &str, check: &str| out.lines().find(|l| l.split_whitespace().nth(1) == Some(case) && l.split_whitespace().nth(2) == Some(check)).unwrap_or_default().to_string();
    for (case, check) in [("attributes", "slice"), ("attributes", "identity/accepted"), ("all-cases", "slice")] {
        let l = line(case, check);
        assert!(l.starts_with("FAIL") && l.contains("bg=grass"), "{case} · {check} must fail naming bg=grass: {l}\n{out}");
    }
    // The slice's first and strongest reason is the background, with its numbers.
    assert!(line("all-cases", "slice").contains("bg=grass: likeness"), "{out}");
    // Every CLIP floor holds: CLIP cannot see the lost character.
    for l in out.lines().filter(|l| l.split_whitespace().nth(2).is_some_and(|c| c.starts_with("clip/"))) {
        assert!(!l.starts_with("FAIL"), "{l}");
    }
    let summary = std::fs::read_to_string(tmp.join("mislabeled/summary.md")).unwrap();
    assert!(summary.contains("### Worst slices") && summary.contains("bg=grass"), "{summary}");

    let (status, out) = run("zorb-seed2", "zorb-seed2", &[]);
    assert_eq!(status, 0, "{out}");
    assert!(!out.lines().any(|l| l.starts_with("FAIL")), "{out}");
    for case in ["attributes", "reordered", "styled"] {
        for check in ["slice", "identity/accepted", "regression", "misses"] {
            assert_eq!(status_of(&out, case, check).as_deref(), Some("PASS"), "{case} {check}: {out}");
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A prompt matrix and a kohya prompt file: their prompts are checked one by one, the worst
/// are named in the console, the summary and the report, and prompts.csv has every score.
/// Bad ones are refused before anything is generated.
#[test]
fn prompt_sets_name_their_worst_prompts_and_bad_ones_are_refused_early() {
    let p = Project::new("prompts");
    p.write("suites/tricky.txt", "# tricky prompts, kohya's format\nzorb, large, at the top, night background --d 3\nred circle, small, on the left, grass background --n blurry --s 6\n");
    let cases = "  - name: grid\n    prompt: \"zorb, {size}, {bg} background\"\n    matrix: { size: [small, large], bg: [sky, white] }\n  - name: file\n    prompts_file: tricky.txt\n";
    let yaml = suite_yaml("prompts", &zorb(), cases).replace("cases:\n  - name: center\n    prompt: \"red circle, large, in the center, sky background\"\n", "cases:\n");
    let suite = p.write("suites/prompts.yaml", &yaml);
    let o = p.run(&["suite", suite.to_str().unwrap(), "--ci"]);
    let out = text(&o);
    assert!(code(&o) <= 1, "{out}");
    for check in ["clip/small+sky", "clip/large+white", "clip/p001", "clip/p002"] {
        assert!(status_of(&out, if check.contains("/p0") { "file" } else { "grid" }, check).is_some(), "{check}: {out}");
    }
    assert!(out.contains("worst prompts (raw cosine"), "{out}");
    let csv = std::fs::read_to_string(p.dir.join("out/prompts/prompts.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 6, "{csv}");
    assert!(csv.contains("file,p002,\"red circle, small, on the left, grass background\""), "{csv}");
    let summary = std::fs::read_to_string(p.dir.join("out/prompts/summary.md")).unwrap();
    assert!(summary.contains("### Worst prompts (raw cosine, of 6"), "{summary}");
    let html = std::fs::read_to_string(p.dir.join("out/prompts/report.html")).unwrap();
    assert!(html.contains("Worst prompts") && html.contains("class=\"shot worst\""), "the report shows the worst prompts with images");
    // The prompt file's `--d 3` replaces the case's seeds for that prompt.
    assert!(p.dir.join("out/prompts/images/file/p001-s3.png").is_file());

    // Refused before generating: a matrix over its cap, a bad flag in a prompt file.
    let over = "  - name: grid\n    prompt: \"{a} {b}\"\n    matrix: { a: [1, 2, 3, 4, 5, 6, 7, 8], b: [1, 2, 3, 4, 5, 6, 7, 8], max: 50 }\n";
    let suite = p.write("suites/over.yaml", &suite_yaml("over", &zorb(), over));
    let o = p.run(&["suite", suite.to_str().unwrap()]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(text(&o).contains("matrix: the matrix has 64 combinations, more than max 50"), "{}", text(&o));
    p.write("suites/bad.txt", "zorb, sky background\nzorb --cfg 7\n");
    let suite = p.write("suites/badfile.yaml", &suite_yaml("badfile", &zorb(), "  - name: file\n    prompts_file: bad.txt\n"));
    let o = p.run(&["suite", suite.to_str().unwrap()]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(text(&o).contains("suites/bad.txt:2:1: unknown flag `--cfg`"), "{}", text(&o));
    assert!(!p.dir.join("out/over").exists() && !p.dir.join("out/badfile").exists(), "nothing may be generated");
}

/// An aesthetic predictor in the published layout, with random weights, reading `width`-wide
/// CLIP embeddings.
fn write_aesthetic(path: &Path, width: usize) {
    let widths = [width, 32, 16, 8, 4, 1];
    let mut rng = Rng::new(11);
    let mut t = BTreeMap::new();
    for (i, k) in [0, 2, 4, 6, 7].iter().enumerate() {
        let (inp, out) = (widths[i], widths[i + 1]);
        let w: Vec<f32> = rng.normals(inp * out).into_iter().map(|v| v / (inp as f32).sqrt()).collect();
        t.insert(format!("layers.{k}.weight"), candle_core::Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap());
        t.insert(format!("layers.{k}.bias"), candle_core::Tensor::from_vec(rng.normals(out), out, &Device::Cpu).unwrap());
    }
    loragate::tensors::save(path, &t, &BTreeMap::new(), SaveDtype::F32).unwrap();
}

/// Identity scored by a DINOv2 model against a folder of references, and the aesthetic check:
/// the numbers come from those models (not CLIP), and every check names its scorer in the
/// console's JUnit, the report and the score baselines. Bad scorer settings stop the run early.
#[test]
fn identity_and_aesthetic_scorers_measure_and_are_named_everywhere() {
    let p = Project::new("scorers");
    for r in ["zorb-large-center-sky.png", "zorb-large-left-grass.png"] {
        std::fs::create_dir_all(p.dir.join("suites/refs/zorb")).unwrap();
        std::fs::copy(common::repo().join("suites/refs").join(r), p.dir.join("suites/refs/zorb").join(r)).unwrap();
    }
    p.write("suites/refs/zorb/notes.txt", "not an image: ignored");
    write_aesthetic(&p.dir.join("suites/aesthetic.safetensors"), 128);
    let dino = common::repo().join("tests/fixtures/scorers/dinov2-tiny");
    let case = "    references: [refs/zorb]\n    seeds: [0, 1]\n";
    // Random weights: the floors are off, this is about wiring; the thresholds are tested on
    // synthetic numbers in verdicts.rs.
    let with = |yaml: String, extra: &str| yaml.replace("thresholds:\n", &format!("{extra}thresholds:\n  identity: -1\n  aesthetic_drop: 1000\n"));
    let scored = with(suite_yaml("scorers", &zorb(), case), &format!("identity_scorer: {}\naesthetic: {{ predictor: aesthetic.safetensors }}\n", dino.display()));
    let suite = p.write("suites/scorers.yaml", &scored);
    let o = p.run(&["suite", suite.to_str().unwrap()]);
    let out = text(&o);
    assert_eq!(code(&o), 0, "{out}");
    assert_eq!(status_of(&out, "center", "identity").as_deref(), Some("PASS"), "{out}");
    assert_eq!(status_of(&out, "center", "aesthetic").as_deref(), Some("PASS"), "{out}");
    let junit = p.junit("scorers");
    assert_eq!(validate(&junit), Vec::<String>::new());
    assert!(junit.contains(r#"name="identity_scorer" value=""#) && junit.contains("dinov2-tiny (DINOv2)"), "{junit}");
    assert!(junit.contains(r#"name="aesthetic_scorer" value="aesthetic.safetensors on tiny-clip""#), "{junit}");
    assert!(junit.contains("scorer=tiny-clip\n"), "the clip checks name CLIP: {junit}");
    assert!(junit.contains("2 reference images") && junit.contains("nearest reference zorb-large-"), "{junit}");
    let report = std::fs::read_to_string(p.dir.join("out/scorers/report.html")).unwrap();
    assert!(report.contains("<td class=\"by\">pixels</td>") && report.contains("dinov2-tiny (DINOv2)</td>"), "the report names scorers");
    let scores: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p.dir.join("baselines/scorers/cpu-f32/center/scores.new.json")).unwrap()).unwrap();
    assert!(scores["scorers"]["clip"].as_str().unwrap().starts_with("tiny-clip "), "{scores}");
    assert!(scores["scorers"]["identity"].as_str().unwrap().contains("dinov2-tiny"), "{scores}");
    assert!(scores["scorers"]["aesthetic"].as_str().unwrap().starts_with("aesthetic.safetensors "), "{scores}");
    assert_eq!(scores["scorers"]["effect"], "pixels");
    assert!(scores["scorer"].as_str().unwrap().contains(" · identity ") && scores["scorer"].as_str().unwrap().contains(" · aesthetic "), "{scores}");
    assert!(scores["measurements"].as_array().unwrap().iter().any(|m| m["metric"] == "aesthetic"), "{scores}");
    assert!(out.contains("models loaded: 1 pipelines, 3 scorers"), "CLIP, DINOv2 and the predictor: {out}");
    // Unchanged, it reads no model: embeddings of images and references and the aesthetic
    // scores come from the cache, and measure the same.
    let again = p.run(&["suite", suite.to_str().unwrap()]);
    assert!(text(&again).contains("(0 generated, 4 cached) · models loaded: 0 pipelines, 0 scorers"), "{}", text(&again));
    let rerun = p.junit("scorers");
    for name in ["identity_mean", "aesthetic_min"] {
        let value = |junit: &str| junit.find(&format!("{name}=")).map(|at| junit[at..].split_whitespace().next().unwrap().to_string());
        assert!(value(&junit).is_some() && value(&junit) == value(&rerun), "{name}: {:?} then {:?}", value(&junit), value(&rerun));
    }

    // The same images scored for identity by CLIP give other numbers: DINOv2 really measured.
    let metric = |junit: &str, name: &str| -> f64 {
        let at = junit.find(&format!("{name}=")).unwrap_or_else(|| panic!("no {name} in {junit}")) + name.len() + 1;
        junit[at..].split_whitespace().next().unwrap().parse().unwrap()
    };
    let plain = p.write("suites/plain.yaml", &with(suite_yaml("plain", &zorb(), case), ""));
    let o = p.run(&["suite", plain.to_str().unwrap(), "--ci"]);
    assert!(text(&o).contains("(0 generated, 4 cached)"), "{}", text(&o));
    let clip_identity = metric(&p.junit("plain"), "identity_mean");
    assert!((clip_identity - metric(&junit, "identity_mean")).abs() > 1e-3, "identity must come from the identity scorer");
    assert!(!p.junit("plain").contains("aesthetic"), "no predictor, no aesthetic check");

    // Bad settings stop the run before anything is generated, at their line.
    let unet = common::repo().join("assets/tinyworld/tiny-sd/unet");
    write_aesthetic(&p.dir.join("suites/wide.safetensors"), 768);
    std::fs::create_dir_all(p.dir.join("suites/refs/empty")).unwrap();
    let cases: &[(&str, String, &str)] = &[
        ("not-a-scorer", with(suite_yaml("x", &zorb(), ""), &format!("identity_scorer: {}\n", unet.display())), "is not a scorer"),
        ("dino-as-clip", suite_yaml("x", &zorb(), "").replace("loras:", &format!("scorer: {}\nloras:", dino.display())), "is not a CLIP model"),
        ("wrong-width", with(suite_yaml("x", &zorb(), ""), "aesthetic: { predictor: wide.safetensors }\n"), "reads 768-wide CLIP embeddings but `tiny-clip` gives 128"),
        ("no-predictor", with(suite_yaml("x", &zorb(), ""), "aesthetic: { predictor: none.safetensors }\n"), "aesthetic predictor `none.safetensors` not found"),
        ("empty-refs", suite_yaml("x", &zorb(), "    references: [refs/empty]\n"), ":17:18: reference folder `refs/empty` has no images"),
    ];
    for (name, yaml, needle) in cases {
        let suite = p.write(&format!("suites/{name}.yaml"), yaml);
        let o = p.run(&["suite", suite.to_str().unwrap()]);
        assert_eq!(code(&o), 2, "{name}: {}", text(&o));
        assert!(text(&o).contains(needle), "{name}: expected {needle:?} in {}", text(&o));
        assert!(text(&o).contains(&format!("{name}.yaml:")), "{name}: the error names the file and line: {}", text(&o));
    }
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    walk(dir).into_iter().map(|f| (f.clone(), std::fs::read(&f).unwrap())).collect()
}

/// docs/checks-and-verdicts.md, "Caching": an unchanged re-run loads no model (counted, not inferred from
/// "0 generated"); a damaged cached image is a miss that is regenerated and rewritten;
/// `--no-cache` neither reads the cache (valid entries with other pixels are ignored) nor
/// writes it (not even the file-hash memo).
#[test]
fn the_cache_regenerates_damaged_images_and_no_cache_reads_and_writes_nothing() {
    use loragate::imageio::{read_image, read_png_text, write_png};
    let p = Project::new("cache");
    let suite = p.write("suites/c.yaml", &suite_yaml("c", &zorb(), ""));
    let s = suite.to_str().unwrap();
    let images = || ["main-s0.png", "main-s0.control.png"].map(|f| read_image(&p.dir.join("out/c/images/center").join(f)).unwrap());
    let loaded = || -> [serde_json::Value; 2] {
        let o = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(p.dir.join("out/c/outcome.json")).unwrap()).unwrap();
        [o["pipelines_loaded"].clone(), o["scorers_loaded"].clone()]
    };
    let first = p.run(&["suite", s]);
    assert_eq!(code(&first), 0, "{}", text(&first));
    assert!(text(&first).contains("(2 generated, 0 cached) · models loaded: 1 pipelines, 1 scorers"), "{}", text(&first));
    assert_eq!(loaded(), [1, 1]);
    let original = images();

    let second = p.run(&["suite", s]);
    assert!(text(&second).contains("(0 generated, 2 cached) · models loaded: 0 pipelines, 0 scorers"), "{}", text(&second));
    assert_eq!(loaded(), [0, 0], "outcome.json counts the models loaded");

    let cached = walk(&p.dir.join(".cache/images"));
    assert_eq!(cached.len(), 2, "{cached:?}");
    std::fs::write(&cached[0], b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let third = p.run(&["suite", s]);
    // The regenerated image has the key, so the embedding, of the one it replaces.
    assert!(text(&third).contains("(1 generated, 1 cached) · models loaded: 1 pipelines, 0 scorers"), "{}", text(&third));
    assert!(read_image(&cached[0]).is_ok(), "the damaged entry is rewritten");
    assert_eq!(images(), original, "the regenerated image is the one the cache held");

    // Valid entries with inverted pixels: any read of the cache would show in the images.
    for f in &cached {
        let mut img = read_image(f).unwrap();
        img.pixels_mut().for_each(|px| px.0 = px.0.map(|v| 255 - v));
        write_png(f, &img, &read_png_text(f).unwrap()).unwrap();
    }
    let before = snapshot(&p.dir.join(".cache"));
    let fourth = p.run(&["suite", s, "--no-cache"]);
    assert!(text(&fourth).contains("(2 generated, 0 cached) · models loaded: 1 pipelines, 1 scorers"), "{}", text(&fourth));
    assert_eq!(images(), original, "--no-cache generated every image instead of reading the cache");
    assert!(snapshot(&p.dir.join(".cache")) == before, "--no-cache wrote into the cache folder");
    // The inverted entries are hits without --no-cache: the run above ignored valid entries.
    let fifth = p.run(&["suite", s]);
    assert!(text(&fifth).contains("(0 generated, 2 cached) · models loaded: 0 pipelines, 0 scorers"), "{}", text(&fifth));
    assert_ne!(images(), original);
}

/// docs/gpu.md: a device or dtype this build or this CPU cannot run is refused before any
/// work, with what to do, and exit code 2.
#[test]
fn a_device_or_dtype_the_build_cannot_run_exits_2_with_the_documented_message() {
    let p = Project::new("devices");
    let suite = p.write("suites/d.yaml", &suite_yaml("d", &zorb(), ""));
    let s = suite.to_str().unwrap();
    let refused = |args: &[&str], message: &str| {
        let o = p.run(args);
        assert_eq!(code(&o), 2, "{args:?}: {}", text(&o));
        assert!(text(&o).contains(message), "{args:?} should say {message:?}: {}", text(&o));
    };
    if cfg!(feature = "cuda") {
        // A CUDA build asks the driver instead; what it says depends on the machine.
        eprintln!("SKIPPED: --device cuda from a CPU-only build (this test binary was built with the cuda feature)");
    } else {
        for args in [vec!["suite", s, "--device", "cuda"], vec!["generate", "x", "--device", "cuda:1"]] {
            refused(&args, "asked for, but this loragate was built without CUDA (rebuild with `--features cuda`, see docs/gpu.md)");
        }
    }
    for dtype in ["f16", "bf16"] {
        refused(&["suite", s, "--dtype", dtype], &format!("{dtype} compute needs a GPU; on the CPU loragate computes in f32"));
        refused(&["generate", "x", "--dtype", dtype], &format!("{dtype} compute needs a GPU; on the CPU loragate computes in f32"));
    }
    refused(&["generate", "x", "--device", "tpu"], "unknown device `tpu` (use cpu, cuda or cuda:N)");
    assert!(!p.dir.join(".cache").exists() && !p.dir.join("out.png").exists(), "nothing may be generated");
}

/// `LORAGATE_KERNELS` forces a kernel build; an unknown one (or one the CPU lacks) is refused
/// before any work with exit 2, never replaced by another build.
#[test]
fn a_kernel_build_that_cannot_run_is_refused_with_exit_2() {
    let p = Project::new("kernels");
    let o = p.run_env(&["generate", "x", "--steps", "1", "--size", "64x64"], &[("LORAGATE_KERNELS", "sse9")]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(text(&o).contains("LORAGATE_KERNELS=sse9: unknown kernel build (use plain, avx2 or avx512)"), "{}", text(&o));
    let cpu = loragate::model::kernels::CpuFeatures::detect();
    match loragate::model::kernels::Build::ALL.into_iter().find(|b| !b.missing_on(&cpu).is_empty()) {
        Some(lacking) => {
            let o = p.run_env(&["generate", "x", "--steps", "1", "--size", "64x64"], &[("LORAGATE_KERNELS", lacking.name())]);
            assert_eq!(code(&o), 2, "{}", text(&o));
            assert!(text(&o).contains("this CPU lacks"), "{}", text(&o));
        }
        None => eprintln!("SKIPPED: refusing a build the CPU lacks (this CPU runs every kernel build)"),
    }
    assert!(!p.dir.join("out.png").exists());
    // The plain build generates.
    let o = p.run_env(&["generate", "x", "--steps", "1", "--size", "64x64"], &[("LORAGATE_KERNELS", "plain")]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(p.dir.join("out.png").is_file());
}

/// The memorization check: a LoRA overtrained on four images (`training/zorb-copycat.yaml`)
/// draws them again and fails; the committed zorb and a clean retrain of its recipe, judged
/// against their regenerated 600-image training set, pass. The copycat's training set is the
/// one its metadata names; the committed zorb's metadata names a folder that is gone, which the
/// check reports as not measured (an error), never as a pass.
#[test]
fn the_memorization_check_fails_a_lora_that_copies_its_training_images_and_passes_the_zorb() {
    let p = Project::new("memorization");
    // The zorb recipe's dataset (training/zorb.yaml), regenerated.
    for args in [&["--concept", "zorb", "--count", "300", "--seed", "11"][..], &["--count", "300", "--seed", "12"][..]] {
        let mut a = vec!["world", "dataset", "--repeats", "1", "--out", "data/zorb"];
        a.extend(args);
        let o = p.run(&a);
        assert_eq!(code(&o), 0, "{}", text(&o));
    }
    let lora = |f: &str| common::repo().join(f).display().to_string();
    let data = p.dir.join("data/zorb").display().to_string();
    let mut cases = String::new();
    // The copycat's training captions that it copies most (docs/checks-and-verdicts.md).
    for (lora, tag) in [("copycat", "copy"), ("zorb", "zorb"), ("retrain", "retrain")] {
        cases.push_str(&format!(
            "  - name: {tag}-grass\n    prompt: \"zorb, large, grass background\"\n    adapters: [{lora}]\n  - name: {tag}-white\n    prompt: \"small, zorb, white background\"\n    adapters: [{lora}]\n"
        ));
    }
    let suite = p.write(
        "suites/memo.yaml",
        &format!(
            r#"name: memo
loras:
  - {{ name: copycat, file: {}, trigger: zorb, class_word: "" }}
  - {{ name: zorb, file: {}, trigger: zorb, class_word: "", training_set: {data} }}
  - {{ name: retrain, file: {}, trigger: zorb, class_word: "", training_set: {data} }}
defaults: {{ seeds: [0, 1, 2], steps: 20, guidance: 5, size: 128x128 }}
thresholds: {{ memorization: 0.6 }}
cases:
{cases}"#,
            lora("tests/fixtures/loras/zorb-copycat.safetensors"),
            lora("assets/loras/zorb-loragate.safetensors"),
            lora("tests/fixtures/loras/zorb-seed3.safetensors"),
        ),
    );
    let o = p.run(&["suite", suite.to_str().unwrap(), "--ci"]);
    let out = text(&o);
    assert_eq!(code(&o), 1, "{out}");
    assert_eq!(status_of(&out, "all-cases", "memorization/copycat").as_deref(), Some("FAIL"), "{out}");
    assert_eq!(status_of(&out, "all-cases", "memorization/zorb").as_deref(), Some("PASS"), "{out}");
    assert_eq!(status_of(&out, "all-cases", "memorization/retrain").as_deref(), Some("PASS"), "{out}");
    // The summary names the worst pair in full: a generated image and the training image it copies.
    let line = out.lines().find(|l| l.starts_with("FAIL memorization/copycat: ")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("copy a training image; closest copy-") && line.contains(" ≈ 1_zorb/000") && line.contains("the dataset its metadata names"), "{line}");
    let junit = p.junit("memo");
    assert!(junit.contains("memorization/copycat") && junit.contains("reproduces its training images"), "{junit}");
    // The report puts each copy beside its training image and counts where outputs converge.
    let html = std::fs::read_to_string(p.dir.join("out/memo/report.html")).unwrap();
    assert!(html.contains("Memorization · copycat (") && html.contains("copies; 4 training images"), "report lacks the copies");
    assert!(html.contains("alt=\"1_zorb/0001.png\"") || html.contains("alt=\"1_zorb/0003.png\""), "report lacks the training images");
    assert!(html.contains("Training images that several outputs of copycat are nearest to"), "report lacks the convergence table");
    let outcome: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p.dir.join("out/memo/outcome.json")).unwrap()).unwrap();
    let zorb = outcome["memorization"].as_array().unwrap().iter().find(|m| m["lora"] == "zorb").unwrap();
    assert_eq!(zorb["training_images"], 600);
    assert_eq!(zorb["images"].as_array().unwrap().len(), 6);

    // Asked for, with a training set that is gone: an error that says where it looked.
    let missing = p.write(
        "suites/gone.yaml",
        &format!(
            "name: gone\nloras:\n  - {{ name: zorb, file: {}, trigger: zorb }}\ndefaults: {{ seeds: [0], steps: 20, guidance: 5, size: 128x128, adapters: [zorb] }}\nthresholds: {{ memorization: 0.6 }}\ncases:\n  - name: white\n    prompt: \"small, zorb, white background\"\n",
            lora("assets/loras/zorb-loragate.safetensors")
        ),
    );
    let o = p.run(&["suite", missing.to_str().unwrap(), "--ci"]);
    let out = text(&o);
    assert_eq!(status_of(&out, "all-cases", "memorization/zorb").as_deref(), Some("ERROR"), "{out}");
    assert!(out.contains("/tmp/zreg") && out.contains("set `training_set:`"), "{out}");
    assert_ne!(code(&o), 0, "{out}");
}
