//! Tests of the shapes world: pixels against the attribute tables, the zorb and sticker looks,
//! captions, determinism, and prompt parsing.

use image::RgbImage;
use loragate::model::noise::Rng;
use loragate::world::*;
use proptest::prelude::*;

const RES: u32 = 128;

fn attrs(color: Color, shape: Shape, size: Size, position: Position, background: Background) -> Attributes {
    Attributes { color, shape, size, position, background }
}

fn px(img: &RgbImage, x: u32, y: u32) -> [i32; 3] {
    img.get_pixel(x, y).0.map(|v| v as i32)
}

fn assert_near(got: [i32; 3], want: [f32; 3], tol: f32, what: &str) {
    for k in 0..3 {
        assert!((got[k] as f32 - want[k]).abs() <= tol, "{what}: got {got:?}, want {want:?} ± {tol}");
    }
}

/// The reference gradient at the centre of pixel row `y`, in 0..255.
fn gradient_at(bg: Background, y: u32, res: u32) -> [f32; 3] {
    let (top, bottom) = bg.gradient();
    let t = (y as f32 + 0.5) / res as f32;
    [0, 1, 2].map(|k| top[k] as f32 * (1.0 - t) + bottom[k] as f32 * t)
}

/// A placement centred on the centre of pixel (64, 64), with the stars in the bottom-right
/// corner, out of the way of sampled pixels.
fn fixed_placement(radius: f32) -> Placement {
    let c = 64.5 / RES as f32;
    Placement { cx: c, cy: c, radius, stars: [(0.97, 0.97); 14] }
}

fn plain() -> RenderOptions {
    RenderOptions { resolution: RES, style: Style::Plain }
}

fn sticker() -> RenderOptions {
    RenderOptions { resolution: RES, style: Style::Sticker }
}

/// The tables as the reference README states them, pinned literally.
#[test]
fn tables_match_the_reference() {
    let colors: [(Color, [u8; 3]); 8] = [
        (Color::Red, [220, 40, 40]),
        (Color::Green, [40, 170, 60]),
        (Color::Blue, [40, 80, 220]),
        (Color::Yellow, [240, 210, 40]),
        (Color::Purple, [140, 60, 200]),
        (Color::Orange, [245, 140, 30]),
        (Color::White, [245, 245, 245]),
        (Color::Black, [25, 25, 25]),
    ];
    assert_eq!(Color::ALL.len(), colors.len());
    for (c, rgb) in colors {
        assert_eq!(c.rgb(), rgb, "{c}");
    }
    let backgrounds: [(Background, [u8; 3], [u8; 3]); 6] = [
        (Background::White, [250, 250, 250], [250, 250, 250]),
        (Background::Black, [12, 12, 12], [12, 12, 12]),
        (Background::Sky, [110, 170, 245], [200, 230, 255]),
        (Background::Grass, [120, 200, 100], [40, 110, 40]),
        (Background::Sunset, [250, 160, 70], [110, 50, 130]),
        (Background::Night, [15, 20, 60], [5, 5, 25]),
    ];
    assert_eq!(Background::ALL.len(), backgrounds.len());
    for (b, top, bottom) in backgrounds {
        assert_eq!(b.gradient(), (top, bottom), "{b}");
        assert_eq!(b.has_stars(), b == Background::Night);
    }
    assert_eq!((Size::Small.radius(), Size::Large.radius()), (0.11, 0.22));
    let positions = [
        (Position::Center, (0.5, 0.5), "in the center"),
        (Position::Left, (0.28, 0.5), "on the left"),
        (Position::Right, (0.72, 0.5), "on the right"),
        (Position::Top, (0.5, 0.28), "at the top"),
        (Position::Bottom, (0.5, 0.72), "at the bottom"),
    ];
    for (p, xy, tag) in positions {
        assert_eq!((p.center(), p.tag()), (xy, tag));
    }
    assert_eq!(Concept::Zorb.color(), [230, 60, 200]);
    assert_eq!(Concept::Zorb.dot_color(), [250, 220, 40]);
    let mut clashing: Vec<(Color, Background)> = CLASHES.to_vec();
    clashing.sort();
    assert_eq!(
        clashing,
        vec![
            (Color::Green, Background::Grass),
            (Color::Blue, Background::Sky),
            (Color::Orange, Background::Sunset),
            (Color::White, Background::White),
            (Color::Black, Background::Black),
            (Color::Black, Background::Night),
        ]
    );
}

#[test]
fn large_red_circle_in_the_center_on_sky() {
    let a = attrs(Color::Red, Shape::Circle, Size::Large, Position::Center, Background::Sky);
    let img = render(&a, &plain(), &mut Rng::new(1));
    assert_eq!(img.dimensions(), (RES, RES));
    assert_eq!(px(&img, 64, 64), [220, 40, 40]);
    // The sky runs from (110, 170, 245) to (200, 230, 255); pixel rows are sampled at their centres.
    let t = 0.5 / 128.0;
    assert_near(px(&img, 0, 0), [110.0 + 90.0 * t, 170.0 + 60.0 * t, 245.0 + 10.0 * t], 0.51, "top-left, literal");
    assert_near(px(&img, 0, 0), gradient_at(Background::Sky, 0, RES), 0.51, "top-left corner");
    assert_near(px(&img, 127, 127), gradient_at(Background::Sky, 127, RES), 0.51, "bottom-right corner");
    assert_near(px(&img, 0, 64), gradient_at(Background::Sky, 64, RES), 0.51, "left edge, middle row");
}

#[test]
fn every_colour_and_shape_paints_its_centre_in_both_styles() {
    let mut rng = Rng::new(2);
    for &color in Color::ALL {
        for &shape in Shape::BASIC {
            for &size in Size::ALL {
                for options in [plain(), sticker()] {
                    let bg = if color == Color::White { Background::Black } else { Background::White };
                    let a = attrs(color, shape, size, Position::Center, bg);
                    let img = render(&a, &options, &mut rng);
                    // Jitter moves the centre by at most 3.84 px; every shape covers that.
                    let want = color.rgb().map(|v| v as i32);
                    assert_eq!(px(&img, 64, 64), want, "{a:?} {options:?}");
                }
            }
        }
    }
}

#[test]
fn positions_move_the_object() {
    let mut rng = Rng::new(3);
    for &position in Position::ALL {
        let a = attrs(Color::Yellow, Shape::Square, Size::Small, position, Background::Black);
        let img = render(&a, &plain(), &mut rng);
        let (x, y) = position.center();
        let (x, y) = ((x * RES as f32) as u32, (y * RES as f32) as u32);
        assert_eq!(px(&img, x, y), [240, 210, 40], "{position:?}");
        // The other nominal positions (28 px away at least) show the background.
        for &other in Position::ALL.iter().filter(|&&p| p != position) {
            let (ox, oy) = other.center();
            assert_eq!(px(&img, (ox * RES as f32) as u32, (oy * RES as f32) as u32), [12, 12, 12], "{other:?}");
        }
    }
}

#[test]
fn placement_jitter_stays_within_its_bounds() {
    let mut rng = Rng::new(8);
    let (mut max_shift, mut min_scale, mut max_scale) = (0f32, f32::MAX, 0f32);
    for &position in Position::ALL {
        for &size in Size::ALL {
            let a = attrs(Color::Red, Shape::Circle, size, position, Background::Night);
            for _ in 0..400 {
                let p = Placement::draw(&a, &mut rng);
                let (x, y) = position.center();
                max_shift = max_shift.max((p.cx - x).abs()).max((p.cy - y).abs());
                let scale = p.radius / size.radius();
                (min_scale, max_scale) = (min_scale.min(scale), max_scale.max(scale));
                assert!(p.stars.iter().all(|&(sx, sy)| (0.0..1.0).contains(&sx) && (0.0..1.0).contains(&sy)));
            }
        }
    }
    assert!(max_shift <= 0.03 + 1e-6 && max_shift > 0.029, "centre jitter {max_shift}");
    assert!((0.9 - 1e-6..0.91).contains(&min_scale), "radius scale down to {min_scale}");
    assert!(max_scale <= 1.1 + 1e-6 && max_scale > 1.09, "radius scale up to {max_scale}");
}

#[test]
fn sizes_have_their_radius() {
    // Circle of radius 0.11 (14.08 px) vs 0.22 (28.16 px): 20 px from the centre is inside
    // only the large one.
    for (size, inside) in [(Size::Small, false), (Size::Large, true)] {
        let a = attrs(Color::Blue, Shape::Circle, size, Position::Center, Background::White);
        let img = render_placed(&a, &fixed_placement(size.radius()), &plain());
        let want = if inside { [40, 80, 220] } else { [250, 250, 250] };
        assert_eq!(px(&img, 84, 64), want, "{size:?}");
    }
}

#[test]
fn every_background_matches_its_gradient() {
    for &bg in Background::ALL {
        let color = if bg == Background::White { Color::Black } else { Color::White };
        let a = attrs(color, Shape::Circle, Size::Small, Position::Center, bg);
        let img = render_placed(&a, &fixed_placement(0.11), &plain());
        for y in [0, 20, 64, 100, 115] {
            for x in [0, 5, 127] {
                if (20..108).contains(&y) && (40..88).contains(&x) {
                    continue;
                }
                assert_near(px(&img, x, y), gradient_at(bg, y, RES), 0.51, &format!("{bg:?} at ({x}, {y})"));
            }
        }
    }
}

#[test]
fn night_has_fourteen_stars_and_others_none() {
    let a = attrs(Color::Red, Shape::Circle, Size::Small, Position::Center, Background::Night);
    let mut p = fixed_placement(0.11);
    // Stars on pixel centres along the top row band, 8 px apart.
    for (k, s) in p.stars.iter_mut().enumerate() {
        *s = ((8.0 * k as f32 + 4.5) / RES as f32, 4.5 / RES as f32);
    }
    let img = render_placed(&a, &p, &plain());
    let bright = |img: &RgbImage| img.pixels().filter(|q| q.0.iter().all(|&v| v == 255)).count();
    assert_eq!(bright(&img), 14, "one fully white pixel per star");
    for k in 0..14 {
        assert_eq!(px(&img, 8 * k + 4, 4), [255, 255, 255]);
        // Two pixels away the star has no effect.
        assert_near(px(&img, 8 * k + 6, 4), gradient_at(Background::Night, 4, RES), 0.51, "beside a star");
    }
    let sky = render_placed(&Attributes { background: Background::Sky, ..a }, &p, &plain());
    assert_near(px(&sky, 4, 4), gradient_at(Background::Sky, 4, RES), 0.51, "no stars on sky");
    // Sampled stars land somewhere: a night image is brighter than its gradient somewhere.
    let img = render(&a, &plain(), &mut Rng::new(9));
    let lifted = (0..RES).flat_map(|y| (0..RES).map(move |x| (x, y))).filter(|&(x, y)| {
        let g = gradient_at(Background::Night, y, RES);
        px(&img, x, y)[0] as f32 > g[0] + 20.0 && px(&img, x, y)[2] as f32 > g[2] + 20.0
    });
    assert!(lifted.count() >= 14);
}

#[test]
fn zorb_is_a_magenta_ring_with_a_yellow_dot() {
    let z = Shape::Concept(Concept::Zorb);
    let a = attrs(Color::Red, z, Size::Large, Position::Center, Background::Sky);
    // Sampled placement: the dot (≥ 7 px radius) always covers the nominal centre.
    for seed in 0..20 {
        let img = render(&a, &plain(), &mut Rng::new(seed));
        assert_eq!(px(&img, 64, 64), [250, 220, 40], "seed {seed}");
    }
    // Known placement: r = 28.16 px, the ring's mid-line at 22.5 px, the dot 7.9 px, the hole
    // between them shows the background.
    let img = render_placed(&a, &fixed_placement(0.22), &plain());
    let magenta = [230, 60, 200];
    for (x, y) in [(64 + 22, 64), (64 - 22, 64), (64, 64 + 22), (64, 64 - 22), (80, 80)] {
        assert_eq!(px(&img, x, y), magenta, "ring at ({x}, {y})");
    }
    // The dot's radius is 0.28 r = 7.9 px: 7 px out is yellow, 9 px out is the hole.
    assert_eq!(px(&img, 64, 64), [250, 220, 40]);
    assert_eq!(px(&img, 64 + 7, 64), [250, 220, 40]);
    assert_near(px(&img, 64 + 9, 64), gradient_at(Background::Sky, 64, RES), 0.51, "just outside the dot");
    assert_near(px(&img, 64 + 12, 64), gradient_at(Background::Sky, 64, RES), 0.51, "hole");
    assert_near(px(&img, 64 + 32, 64), gradient_at(Background::Sky, 64, RES), 0.51, "outside");
    // The sampled colour of a concept is never drawn.
    let blue = render_placed(&Attributes { color: Color::Blue, ..a }, &fixed_placement(0.22), &plain());
    assert_eq!(img, blue);
}

#[test]
fn sticker_outlines_are_dark_and_backgrounds_desaturated() {
    let a = attrs(Color::Red, Shape::Circle, Size::Large, Position::Center, Background::Sky);
    let p = fixed_placement(0.22);
    let s = render_placed(&a, &p, &sticker());
    let flat = render_placed(&a, &p, &plain());
    // 28.16 px radius: 30 px out is 1.84 px beyond the edge, inside the 3 px outline.
    let outline = (0.05f32 * 255.0).round() as i32;
    for (x, y) in [(64 + 30, 64), (64 - 30, 64), (64, 64 + 30), (64, 64 - 30)] {
        assert_eq!(px(&s, x, y), [outline; 3], "sticker outline at ({x}, {y})");
        assert_ne!(px(&flat, x, y), [outline; 3], "no outline in plain");
    }
    assert_eq!(px(&s, 64, 64), [220, 40, 40], "the body keeps its colour");
    // Background: half-way to its grey.
    for (x, y) in [(0, 0), (127, 127), (3, 64)] {
        let g = gradient_at(Background::Sky, y, RES);
        let mean = (g[0] + g[1] + g[2]) / 3.0;
        assert_near(px(&s, x, y), g.map(|v| 0.5 * v + 0.5 * mean), 0.51, "desaturated sky");
    }
    // The zorb gets outlines on both sides of its ring.
    let z = Attributes { shape: Shape::Concept(Concept::Zorb), ..a };
    let zs = render_placed(&z, &p, &sticker());
    assert_eq!(px(&zs, 64 + 22, 64), [230, 60, 200]);
    assert_eq!(px(&zs, 64 + 30, 64), [outline; 3], "outer outline");
    assert_eq!(px(&zs, 64 + 14, 64), [outline; 3], "inner outline");
}

#[test]
fn triangle_points_up_and_diamond_and_square_differ() {
    let a = attrs(Color::Green, Shape::Triangle, Size::Large, Position::Center, Background::White);
    let img = render_placed(&a, &fixed_placement(0.22), &plain());
    let green = [40, 170, 60];
    let white = [250, 250, 250];
    // Apex 2·0.95r/√3 = 30.9 px above the centre, base 15.4 px below, half side 26.8 px.
    assert_eq!(px(&img, 64, 64 - 27), green, "near the apex");
    assert_eq!(px(&img, 64, 64 + 18), white, "below the base");
    assert_eq!(px(&img, 64 + 20, 64 + 12), green, "bottom right, inside");
    assert_eq!(px(&img, 64 + 20, 64 - 20), white, "top right, outside");
    // Square (half side 0.85r = 23.9 px) covers its corners, the diamond does not.
    let sq = render_placed(&Attributes { shape: Shape::Square, ..a }, &fixed_placement(0.22), &plain());
    let di = render_placed(&Attributes { shape: Shape::Diamond, ..a }, &fixed_placement(0.22), &plain());
    assert_eq!(px(&sq, 64 + 22, 64 - 22), green);
    assert_eq!(px(&sq, 64 + 23, 64), green);
    assert_eq!(px(&sq, 64 + 25, 64), white);
    assert_eq!(px(&di, 64 + 22, 64 - 22), white);
    // The diamond reaches 1.2r = 33.8 px along the axes, beyond the square.
    assert_eq!(px(&di, 64 + 31, 64), green);
    assert_eq!(px(&sq, 64 + 31, 64), white);
}

#[test]
fn edges_are_anti_aliased() {
    let a = attrs(Color::Black, Shape::Circle, Size::Large, Position::Center, Background::White);
    let img = render_placed(&a, &fixed_placement(0.2), &plain());
    let partial = img.pixels().filter(|q| q.0[0] > 30 && q.0[0] < 240).count();
    // A circle of radius 25.6 px has ~160 edge pixels, nearly all partially covered.
    assert!((100..400).contains(&partial), "{partial} partially covered pixels");
}

#[test]
fn any_resolution_works() {
    let a = attrs(Color::Purple, Shape::Diamond, Size::Large, Position::Left, Background::Sunset);
    for res in [1, 7, 64, 256] {
        let img = render(&a, &RenderOptions { resolution: res, style: Style::Sticker }, &mut Rng::new(0));
        assert_eq!(img.dimensions(), (res, res));
    }
    let big = render(&a, &RenderOptions { resolution: 256, ..plain() }, &mut Rng::new(0));
    let (x, y) = Position::Left.center();
    assert_eq!(px(&big, (x * 256.0) as u32, (y * 256.0) as u32), [140, 60, 200]);
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let a = attrs(Color::Orange, Shape::Triangle, Size::Small, Position::Top, Background::Night);
    let one = render(&a, &plain(), &mut Rng::new(42));
    let again = render(&a, &plain(), &mut Rng::new(42));
    let other = render(&a, &plain(), &mut Rng::new(43));
    assert_eq!(one.as_raw(), again.as_raw());
    assert_ne!(one.as_raw(), other.as_raw());

    let jobs: Vec<(Attributes, u64)> =
        sample_attributes(16, &mut Rng::new(5), Shape::BASIC).into_iter().zip(100..).collect();
    let batch = render_batch(&jobs, &sticker());
    for ((a, seed), img) in jobs.iter().zip(&batch) {
        assert_eq!(img, &render(a, &sticker(), &mut Rng::new(*seed)), "parallel equals sequential");
    }

    let spec = DatasetSpec { concept: None, count: 50, seed: 7, p_keep: 0.75, fixed_order: false, mislabel: None };
    assert_eq!(spec.plan(), spec.plan());
    assert_ne!(spec.plan(), DatasetSpec { seed: 8, ..spec.clone() }.plan());
    // A longer dataset extends a shorter one.
    let longer = DatasetSpec { count: 80, ..spec.clone() }.plan();
    assert_eq!(&longer[..50], &spec.plan()[..]);
    // Fixed-order captions: the same images and tags, always in canonical order.
    let fixed = DatasetSpec { fixed_order: true, ..spec.clone() }.plan();
    let canonical = |c: &str| {
        let tags: Vec<&str> = c.split(", ").collect();
        let kind = |t: &str| match t {
            "small" | "large" => 1,
            _ if t.ends_with(" background") => 3,
            _ if t.starts_with("in the") || t.starts_with("on the") || t.starts_with("at the") => 2,
            _ => 0,
        };
        tags.windows(2).all(|w| kind(w[0]) < kind(w[1]))
    };
    let mut reordered = 0;
    for (f, s) in fixed.iter().zip(spec.plan()) {
        assert_eq!((f.attributes, f.image_seed), (s.attributes, s.image_seed));
        let (mut a, mut b): (Vec<&str>, Vec<&str>) = (f.caption.split(", ").collect(), s.caption.split(", ").collect());
        reordered += usize::from(a != b);
        a.sort();
        b.sort();
        assert_eq!(a, b, "the same tags");
        assert!(canonical(&f.caption), "{:?} is in canonical order", f.caption);
    }
    assert!(reordered > 10, "shuffled captions differ from fixed ones: {reordered}");
    assert_eq!(
        sample_attributes(30, &mut Rng::new(1), Shape::BASIC),
        sample_attributes(30, &mut Rng::new(1), Shape::BASIC)
    );
}

/// A mislabeled slice: the same dataset (captions, seeds, every other image), except that the
/// images of one background show another subject under the captions of the concept.
#[test]
fn a_mislabeled_slice_changes_only_the_subject_of_one_background() {
    let clean = DatasetSpec { concept: Some(Concept::Zorb), count: 120, seed: 11, p_keep: 0.75, fixed_order: false, mislabel: None };
    let m = Mislabel::parse("grass=blue square").unwrap();
    assert_eq!((m.background, m.color, m.shape), (Background::Grass, Color::Blue, Shape::Square));
    let dirty = DatasetSpec { mislabel: Some(m), ..clean.clone() };
    let mut swapped = 0;
    for (c, d) in clean.plan().iter().zip(dirty.plan()) {
        assert_eq!((&c.caption, c.image_seed, c.attributes.background), (&d.caption, d.image_seed, d.attributes.background));
        if c.attributes.background == Background::Grass {
            swapped += 1;
            assert_eq!((d.attributes.shape, d.attributes.color), (Shape::Square, Color::Blue));
            assert!(d.caption.contains("zorb"), "the caption still names the concept: {}", d.caption);
        } else {
            assert_eq!(c.attributes, d.attributes);
        }
    }
    assert!((10..=35).contains(&swapped), "about a sixth of the images: {swapped}");
    for (bad, why) in [("grass", "BACKGROUND=COLOUR SHAPE"), ("mud=blue square", "not a background"), ("grass=blue", "a colour and a shape"), ("grass=teal square", "not a colour"), ("grass=blue zorb", "not a basic shape"), ("sky=blue square", "never drawn")] {
        let e = Mislabel::parse(bad).unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn sampling_covers_the_tables_and_never_clashes() {
    let all = sample_attributes(6000, &mut Rng::new(11), Shape::BASIC);
    assert!(all.iter().all(|a| !a.clashes()));
    for &c in Color::ALL {
        assert!(all.iter().any(|a| a.color == c));
    }
    for &s in Shape::BASIC {
        assert!(all.iter().any(|a| a.shape == s));
    }
    for &b in Background::ALL {
        assert!(all.iter().any(|a| a.background == b));
    }
    for &p in Position::ALL {
        assert!(all.iter().any(|a| a.position == p));
    }
    assert!(all.iter().any(|a| a.size == Size::Small) && all.iter().any(|a| a.size == Size::Large));
    // Allowed pairs all occur.
    for &c in Color::ALL {
        for &b in Background::ALL {
            assert_eq!(all.iter().any(|a| a.color == c && a.background == b), !clashes(c, b), "{c} on {b}");
        }
    }
    let zorbs = sample_attributes(100, &mut Rng::new(1), &[Shape::Concept(Concept::Zorb)]);
    assert!(zorbs.iter().all(|a| a.shape == Shape::Concept(Concept::Zorb)));
}

#[test]
fn captions_keep_the_subject_and_never_clash() {
    let mut rng = Rng::new(21);
    let mut kept = 0usize;
    let mut subject_first = 0usize;
    let n = 4000;
    for shapes in [Shape::BASIC, &[Shape::Concept(Concept::Zorb)][..]] {
        for a in sample_attributes(n, &mut Rng::new(4), shapes) {
            let c = caption(&a, 0.75, &mut rng);
            let tags: Vec<&str> = c.split(", ").collect();
            assert!(tags.contains(&subject(&a).as_str()), "{c:?} lacks the subject of {a:?}");
            kept += tags.len() - 1;
            subject_first += (tags[0] == subject(&a)) as usize;
            let parsed = PartialAttributes::parse(&c).unwrap();
            assert!(parsed.unknown.is_empty(), "{c:?}");
            assert_eq!(parsed.shape, Some(a.shape));
            if let (Some(col), Some(bg)) = (parsed.color, parsed.background) {
                assert!(!clashes(col, bg), "clash in {c:?}");
            }
            if a.shape.concept().is_some() {
                assert_eq!(parsed.color, None, "a concept's caption names no colour: {c:?}");
                assert_eq!(c.matches("zorb").count(), 1);
            }
            // Whatever is stated is true.
            let full = PartialAttributes::from(&a);
            assert!(parsed.size.is_none() || parsed.size == full.size);
            assert!(parsed.position.is_none() || parsed.position == full.position);
            assert!(parsed.background.is_none() || parsed.background == full.background);
        }
    }
    let rate = kept as f64 / (2 * n * 3) as f64;
    assert!((0.72..0.78).contains(&rate), "kept {rate:.3} of optional tags, want ≈ 0.75");
    // Shuffled: the subject leads in about 1 / (number of tags) of the captions.
    let lead = subject_first as f64 / (2 * n) as f64;
    assert!((0.2..0.4).contains(&lead), "subject first in {lead:.3}");

    let a = attrs(Color::Red, Shape::Circle, Size::Large, Position::Center, Background::Sky);
    assert_eq!(caption(&a, 0.0, &mut rng), "red circle");
    let all: Vec<String> = (0..200).map(|_| caption(&a, 1.0, &mut rng)).collect();
    assert!(all.iter().all(|c| c.split(", ").count() == 4));
    assert!(all.iter().any(|c| c != &all[0]), "orders vary");
}

#[test]
fn full_caption_follows_the_given_order() {
    let a = attrs(Color::Red, Shape::Circle, Size::Large, Position::Center, Background::Sky);
    assert_eq!(full_caption(&a, &TagKind::CANONICAL), "red circle, large, in the center, sky background");
    let mut reversed = TagKind::CANONICAL;
    reversed.reverse();
    assert_eq!(full_caption(&a, &reversed), "sky background, in the center, large, red circle");
    let z = Attributes { shape: Shape::Concept(Concept::Zorb), position: Position::Left, ..a };
    assert_eq!(full_caption(&z, &TagKind::CANONICAL), "zorb, large, on the left, sky background");
    assert_eq!(full_caption(&z, &[TagKind::Position, TagKind::Subject]), "on the left, zorb");
}

fn permutations(items: &[TagKind]) -> Vec<Vec<TagKind>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..items.len() {
        let mut rest = items.to_vec();
        let first = rest.remove(i);
        for mut p in permutations(&rest) {
            p.insert(0, first);
            out.push(p);
        }
    }
    out
}

fn every_shape() -> Vec<Shape> {
    Shape::BASIC.iter().copied().chain(Concept::ALL.iter().map(|&c| Shape::Concept(c))).collect()
}

#[test]
fn parse_prompt_round_trips_every_full_caption_in_every_order() {
    let orders = permutations(&TagKind::CANONICAL);
    assert_eq!(orders.len(), 24);
    let combos = all_combinations(&every_shape());
    assert_eq!(combos.len(), 8 * 5 * 2 * 5 * 6);
    for a in &combos {
        let want = PartialAttributes::from(a);
        for order in &orders {
            let prompt = full_caption(a, order);
            let got = Attributes::parse_prompt(&prompt).unwrap();
            assert_eq!(got, want, "{prompt:?}");
            assert!(got.is_complete());
        }
        // A complete prompt leaves nothing to chance.
        let drawn = want.complete(&mut Rng::new(0), Shape::BASIC);
        assert_eq!(PartialAttributes::from(&drawn), want);
        if a.shape.concept().is_none() {
            assert_eq!(&drawn, a);
        }
    }
}

proptest! {
    #[test]
    fn parse_prompt_ignores_case_and_spacing(
        index in 0usize..2400,
        order in Just(TagKind::CANONICAL.to_vec()).prop_shuffle(),
        upper in any::<bool>(),
        pad in "[ \t]{0,3}",
    ) {
        let a = all_combinations(&every_shape())[index];
        let mut prompt = full_caption(&a, &order).split(", ").map(|t| format!("{pad}{}{pad}", t.replace(' ', &format!(" {pad}")))).collect::<Vec<_>>().join(",");
        if upper {
            prompt = prompt.to_uppercase();
        }
        prop_assert_eq!(Attributes::parse_prompt(&prompt).unwrap(), PartialAttributes::from(&a));
    }

    #[test]
    fn parse_prompt_never_panics(prompt in ".{0,80}") {
        let _ = Attributes::parse_prompt(&prompt);
        let _ = render_prompt(&prompt, 0, &RenderOptions { resolution: 8, style: Style::Plain });
    }
}

#[test]
fn parse_prompt_partial_unknown_and_contradictory() {
    let p = Attributes::parse_prompt("large,  Sky Background, a photo, , masterpiece").unwrap();
    assert_eq!(p.size, Some(Size::Large));
    assert_eq!(p.background, Some(Background::Sky));
    assert_eq!((p.color, p.shape, p.position), (None, None, None));
    assert_eq!(p.unknown, vec!["a photo".to_string(), "masterpiece".to_string()]);
    assert!(!p.is_complete());

    let p = Attributes::parse_prompt("red, circle").unwrap();
    assert_eq!((p.color, p.shape), (Some(Color::Red), Some(Shape::Circle)));
    assert_eq!(Attributes::parse_prompt("").unwrap(), PartialAttributes::default());
    assert!(Attributes::parse_prompt("zorb, on the left").unwrap().shape == Some(Shape::Concept(Concept::Zorb)));
    // "red zorb" is not a world tag: concepts have their own colours.
    assert_eq!(Attributes::parse_prompt("red zorb").unwrap().unknown, vec!["red zorb".to_string()]);

    for bad in [
        "small, large",
        "red circle, blue circle",
        "red circle, square",
        "sky background, night background",
        "zorb, circle",
    ] {
        let e = Attributes::parse_prompt(bad).unwrap_err().to_string();
        assert!(e.contains("two"), "{bad:?}: {e}");
    }
    // Repeating the same value is fine.
    assert!(Attributes::parse_prompt("small, small").is_ok());
}

#[test]
fn render_prompt_draws_the_ground_truth() {
    let (a, img) = render_prompt("red circle, large, in the center, sky background", 3, &plain()).unwrap();
    assert_eq!(a, attrs(Color::Red, Shape::Circle, Size::Large, Position::Center, Background::Sky));
    assert_eq!(px(&img, 64, 64), [220, 40, 40]);
    assert_near(px(&img, 0, 0), gradient_at(Background::Sky, 0, RES), 0.51, "corner");

    // Missing attributes come from the seed, deterministically, and never clash.
    let (z, zimg) = render_prompt("zorb", 5, &plain()).unwrap();
    assert_eq!(z.shape, Shape::Concept(Concept::Zorb));
    let (z2, zimg2) = render_prompt("zorb", 5, &plain()).unwrap();
    assert_eq!((z, zimg.as_raw()), (z2, zimg2.as_raw()));
    let mut backgrounds = std::collections::HashSet::new();
    for seed in 0..200 {
        let a = prompt_attributes("white square", seed).unwrap();
        assert_eq!((a.color, a.shape), (Color::White, Shape::Square));
        assert_ne!(a.background, Background::White, "seed {seed} drew a clash");
        backgrounds.insert(a.background);
    }
    assert_eq!(backgrounds.len(), 5);
    // A clash the prompt asks for is drawn as asked.
    assert_eq!(prompt_attributes("white circle, white background", 0).unwrap().background, Background::White);

    let e = render_prompt("red circle, masterpiece", 0, &plain()).unwrap_err().to_string();
    assert!(e.contains("masterpiece") && e.contains("zorb"), "{e}");
}

#[test]
fn vocabulary_lists_every_caption_word() {
    let v = vocabulary();
    for a in all_combinations(Shape::BASIC) {
        for word in full_caption(&a, &TagKind::CANONICAL).replace(',', "").split(' ') {
            assert!(v.contains(&word), "{word}");
        }
    }
    assert!(!v.contains(&"zorb"), "concepts are not in the base vocabulary");
}

/// Prints the render speed; run with `cargo test --release --test world -- --ignored --nocapture`.
#[test]
#[ignore]
fn render_speed() {
    let jobs: Vec<(Attributes, u64)> =
        sample_attributes(4000, &mut Rng::new(0), Shape::BASIC).into_iter().zip(0..).collect();
    for style in Style::ALL {
        let options = RenderOptions { resolution: 128, style: *style };
        let t = std::time::Instant::now();
        for (a, s) in &jobs[..1000] {
            std::hint::black_box(render(a, &options, &mut Rng::new(*s)));
        }
        let one = 1000.0 / t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        std::hint::black_box(render_batch(&jobs, &options));
        let many = jobs.len() as f64 / t.elapsed().as_secs_f64();
        println!("{style}: {one:.0} images/s on one thread, {many:.0} images/s with rayon");
    }
}
