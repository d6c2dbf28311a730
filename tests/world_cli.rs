//! Runs the built `loragate world` command: dataset files and layout, refusals, and `render`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn loragate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loragate")).args(args).output().expect("run loragate")
}

/// A fresh, empty folder name under the system temp dir, unique to this process and test.
fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loragate-world-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn sorted_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn dataset_writes_numbered_images_and_captions() {
    let out = temp("zorb");
    let o = loragate(&["world", "dataset", "--concept", "zorb", "--count", "12", "--out", s(&out), "--seed", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut want: Vec<String> = (0..12).flat_map(|i| [format!("{i:04}.png"), format!("{i:04}.txt")]).collect();
    want.sort();
    assert_eq!(sorted_names(&out), want, "exactly the pairs, no temporary files");
    for i in 0..12 {
        let caption = std::fs::read_to_string(out.join(format!("{i:04}.txt"))).unwrap();
        assert!(caption.split(", ").any(|t| t == "zorb"), "{caption:?}");
        let img = image::open(out.join(format!("{i:04}.png"))).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (128, 128));
        // Every zorb has its yellow dot in the middle of its (jittered) position: some pixel
        // is exactly the dot colour.
        assert!(img.pixels().any(|p| p.0 == [250, 220, 40]));
        assert!(img.pixels().any(|p| p.0 == [230, 60, 200]));
    }
    let text = loragate::imageio::read_png_text(&out.join("0000.png")).unwrap();
    assert!(text.iter().any(|(k, v)| k == "loragate-world" && v.contains("ground_truth")));

    // Same seed, same bytes; another seed, other images.
    let again = temp("zorb-again");
    let other = temp("zorb-other");
    assert!(
        loragate(&["world", "dataset", "--concept", "zorb", "--count", "12", "--out", s(&again), "--seed", "3"])
            .status
            .success()
    );
    assert!(
        loragate(&["world", "dataset", "--concept", "zorb", "--count", "12", "--out", s(&other), "--seed", "4"])
            .status
            .success()
    );
    for i in 0..12 {
        for ext in ["png", "txt"] {
            let name = format!("{i:04}.{ext}");
            assert_eq!(std::fs::read(out.join(&name)).unwrap(), std::fs::read(again.join(&name)).unwrap(), "{name}");
        }
    }
    assert_ne!(std::fs::read(out.join("0000.png")).unwrap(), std::fs::read(other.join("0000.png")).unwrap());
    for d in [out, again, other] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn dataset_uses_the_kohya_layout_with_repeats() {
    let out = temp("kohya");
    let o = loragate(&["world", "dataset", "--concept", "zorb", "--count", "3", "--out", s(&out), "--repeats", "10"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sorted_names(&out), vec!["10_zorb"]);
    assert_eq!(sorted_names(&out.join("10_zorb")).len(), 6);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), s(&out.join("10_zorb")));

    let shapes = temp("kohya-shapes");
    let o = loragate(&[
        "world",
        "dataset",
        "--count",
        "5",
        "--out",
        s(&shapes),
        "--repeats",
        "2",
        "--style",
        "sticker",
        "--resolution",
        "64",
        "--p-keep",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = shapes.join("2_shapes");
    for i in 0..5 {
        let caption = std::fs::read_to_string(dir.join(format!("{i:04}.txt"))).unwrap();
        assert_eq!(caption.split(", ").count(), 4, "--p-keep 1 keeps every tag: {caption:?}");
        assert!(!caption.contains("zorb"));
        let img = image::open(dir.join(format!("{i:04}.png"))).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (64, 64));
        // Sticker outlines: some pixels are the outline grey.
        assert!(img.pixels().any(|p| p.0 == [13, 13, 13]), "image {i} has no outline");
    }
    std::fs::remove_dir_all(out).unwrap();
    std::fs::remove_dir_all(shapes).unwrap();
}

#[test]
fn dataset_refuses_a_non_empty_folder_unless_overwrite() {
    let out = temp("overwrite");
    assert!(loragate(&["world", "dataset", "--count", "6", "--out", s(&out)]).status.success());
    std::fs::write(out.join("notes.md"), "mine").unwrap();

    let o = loragate(&["world", "dataset", "--count", "2", "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("not empty") && e.contains("new folder") && e.contains("--overwrite"), "{e}");

    let o = loragate(&["world", "dataset", "--count", "2", "--out", s(&out), "--overwrite", "--seed", "9"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The stale samples 2..5 are gone; files that are not samples stay.
    assert_eq!(sorted_names(&out), vec!["0000.png", "0000.txt", "0001.png", "0001.txt", "notes.md"]);

    // Overwriting a kohya dataset with other repeats warns about the old image folder.
    let kohya = temp("overwrite-kohya");
    assert!(loragate(&["world", "dataset", "--count", "2", "--out", s(&kohya), "--repeats", "3"]).status.success());
    let o = loragate(&["world", "dataset", "--count", "2", "--out", s(&kohya), "--repeats", "5", "--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("3_shapes is another kohya image folder"), "{}", stderr(&o));
    std::fs::remove_dir_all(out).unwrap();
    std::fs::remove_dir_all(kohya).unwrap();
}

#[test]
fn dataset_rejects_bad_values_with_clear_messages() {
    let out = temp("bad");
    let cases: [(&[&str], &[&str]); 6] = [
        (&["--concept", "blorp"], &["unknown concept `blorp`", "zorb"]),
        (&["--count", "0"], &["--count"]),
        (&["--p-keep", "1.5"], &["--p-keep"]),
        (&["--resolution", "0"], &["--resolution"]),
        (&["--repeats", "0"], &["--repeats"]),
        (&["--style", "comic"], &["plain", "sticker"]),
    ];
    for (extra, needles) in cases {
        let mut args = vec!["world", "dataset", "--out", s(&out)];
        args.extend_from_slice(extra);
        let o = loragate(&args);
        assert_eq!(o.status.code(), Some(2), "{extra:?}");
        let e = stderr(&o);
        for n in needles {
            assert!(e.contains(n), "{extra:?}: {e}");
        }
        assert!(!out.exists(), "{extra:?} must not create the folder");
    }
}

#[test]
fn render_writes_the_ground_truth_for_a_prompt() {
    let dir = temp("render");
    let file = dir.join("truth.png");
    let o = loragate(&[
        "world",
        "render",
        "red circle, large, in the center, sky background",
        "-o",
        s(&file),
        "--seed",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("ground truth: red circle, large, in the center, sky background"));
    let text = loragate::imageio::read_png_text(&file).unwrap();
    assert!(text.iter().any(|(k, v)| k == "loragate-world" && v.contains("\"seed\":1")), "{text:?}");
    let img = image::open(&file).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (128, 128));
    assert_eq!(img.get_pixel(64, 64).0, [220, 40, 40]);
    // Sky gradient at the top-left pixel centre: 110·(1 − t) + 200·t with t = 0.5 / 128.
    assert!((img.get_pixel(0, 0).0[0] as i32 - 110).abs() <= 1);

    let sticker = dir.join("zorb.png");
    let o =
        loragate(&["world", "render", "zorb, small", "-o", s(&sticker), "--style", "sticker", "--resolution", "96"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("ground truth: zorb, small"));
    assert_eq!(image::open(&sticker).unwrap().to_rgb8().dimensions(), (96, 96));

    let o = loragate(&["world", "render", "red circle, masterpiece", "-o", s(&dir.join("x.png"))]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("`masterpiece` is not a shapes-world tag"), "{}", stderr(&o));
    let o = loragate(&["world", "render", "small, large", "-o", s(&dir.join("x.png"))]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!dir.join("x.png").exists());
    std::fs::remove_dir_all(dir).unwrap();
}
