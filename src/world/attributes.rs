//! The attribute tables of the shapes world (colours, shapes, sizes, positions, backgrounds,
//! concepts) and seeded sampling of attribute sets that avoid colour/background clashes.

use crate::model::noise::Rng;

/// Defines a fieldless enum with `ALL`, a lower-case `name()` and `from_name()`.
macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in table order (the order sampling indexes into).
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The word used in captions.
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// The value whose `name()` is `text` (exact, lower case).
            pub fn from_name(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

named_enum! {
    /// The colour of an ordinary shape.
    Color { Red => "red", Green => "green", Blue => "blue", Yellow => "yellow", Purple => "purple",
            Orange => "orange", White => "white", Black => "black" }
}

named_enum! {
    /// A concept the base model never saw; LoRAs teach it.
    Concept { Zorb => "zorb" }
}

named_enum! {
    /// Radius class of the object.
    Size { Small => "small", Large => "large" }
}

named_enum! {
    /// Where the object's centre sits.
    Position { Center => "center", Left => "left", Right => "right", Top => "top", Bottom => "bottom" }
}

named_enum! {
    /// A top-to-bottom gradient behind the object.
    Background { White => "white", Black => "black", Sky => "sky", Grass => "grass", Sunset => "sunset",
                 Night => "night" }
}

impl Color {
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 40, 40],
            Color::Green => [40, 170, 60],
            Color::Blue => [40, 80, 220],
            Color::Yellow => [240, 210, 40],
            Color::Purple => [140, 60, 200],
            Color::Orange => [245, 140, 30],
            Color::White => [245, 245, 245],
            Color::Black => [25, 25, 25],
        }
    }
}

impl Concept {
    /// The ring's colour (magenta for zorb).
    pub fn color(self) -> [u8; 3] {
        match self {
            Concept::Zorb => [230, 60, 200],
        }
    }

    /// The colour of the dot in the ring's middle.
    pub fn dot_color(self) -> [u8; 3] {
        match self {
            Concept::Zorb => [250, 220, 40],
        }
    }

    /// The names of all concepts, for error messages.
    pub fn known_names() -> String {
        Concept::ALL.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ")
    }
}

impl Size {
    /// Radius as a fraction of the image side, before the ±10 % jitter.
    pub fn radius(self) -> f32 {
        match self {
            Size::Small => 0.11,
            Size::Large => 0.22,
        }
    }
}

impl Position {
    /// Centre `(x, y)` as fractions of the image side (y grows downwards), before jitter.
    pub fn center(self) -> (f32, f32) {
        match self {
            Position::Center => (0.5, 0.5),
            Position::Left => (0.28, 0.5),
            Position::Right => (0.72, 0.5),
            Position::Top => (0.5, 0.28),
            Position::Bottom => (0.5, 0.72),
        }
    }

    /// The caption tag, e.g. `on the left`.
    pub fn tag(self) -> &'static str {
        match self {
            Position::Center => "in the center",
            Position::Left => "on the left",
            Position::Right => "on the right",
            Position::Top => "at the top",
            Position::Bottom => "at the bottom",
        }
    }
}

impl Background {
    /// `(top, bottom)` colours of the vertical gradient.
    pub fn gradient(self) -> ([u8; 3], [u8; 3]) {
        match self {
            Background::White => ([250, 250, 250], [250, 250, 250]),
            Background::Black => ([12, 12, 12], [12, 12, 12]),
            Background::Sky => ([110, 170, 245], [200, 230, 255]),
            Background::Grass => ([120, 200, 100], [40, 110, 40]),
            Background::Sunset => ([250, 160, 70], [110, 50, 130]),
            Background::Night => ([15, 20, 60], [5, 5, 25]),
        }
    }

    /// Whether the background gets star dots.
    pub fn has_stars(self) -> bool {
        self == Background::Night
    }
}

/// What is drawn: an ordinary shape or a concept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Square,
    /// Equilateral, pointing up.
    Triangle,
    Diamond,
    Concept(Concept),
}

impl Shape {
    /// The ordinary shapes, the default sampling set.
    pub const BASIC: &'static [Shape] = &[Shape::Circle, Shape::Square, Shape::Triangle, Shape::Diamond];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Diamond => "diamond",
            Shape::Concept(c) => c.name(),
        }
    }

    /// An ordinary shape or a concept by name.
    pub fn from_name(text: &str) -> Option<Self> {
        Shape::BASIC.iter().copied().find(|s| s.name() == text).or_else(|| Concept::from_name(text).map(Shape::Concept))
    }

    pub fn concept(self) -> Option<Concept> {
        match self {
            Shape::Concept(c) => Some(c),
            _ => None,
        }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Colour/background pairs that are never drawn: the object would vanish into (or be
/// indistinguishable from) its background.
pub const CLASHES: &[(Color, Background)] = &[
    (Color::White, Background::White),
    (Color::Black, Background::Black),
    (Color::Black, Background::Night),
    (Color::Green, Background::Grass),
    (Color::Orange, Background::Sunset),
    (Color::Blue, Background::Sky),
];

/// Whether `color` on `background` is one of the forbidden [`CLASHES`].
pub fn clashes(color: Color, background: Background) -> bool {
    CLASHES.contains(&(color, background))
}

/// One image's worth of ground truth.
///
/// For a concept, `color` is still sampled (as in the reference) but not drawn or captioned:
/// the concept brings its own colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attributes {
    pub color: Color,
    pub shape: Shape,
    pub size: Size,
    pub position: Position,
    pub background: Background,
}

impl Attributes {
    /// The RGB the object's body is painted with.
    pub fn body_rgb(&self) -> [u8; 3] {
        match self.shape {
            Shape::Concept(c) => c.color(),
            _ => self.color.rgb(),
        }
    }

    /// Whether the colour clashes with the background (never true for sampled attributes).
    pub fn clashes(&self) -> bool {
        clashes(self.color, self.background)
    }

    /// One attribute set drawn uniformly from the tables and `shapes` (the basic shapes when
    /// empty), redrawn until it has no clash.
    pub fn sample(rng: &mut Rng, shapes: &[Shape]) -> Self {
        let shapes = if shapes.is_empty() { Shape::BASIC } else { shapes };
        loop {
            let a = Attributes {
                color: Color::ALL[rng.below(Color::ALL.len())],
                shape: shapes[rng.below(shapes.len())],
                background: Background::ALL[rng.below(Background::ALL.len())],
                size: Size::ALL[rng.below(Size::ALL.len())],
                position: Position::ALL[rng.below(Position::ALL.len())],
            };
            // At most 6 of the 48 colour/background pairs clash, so this ends quickly.
            if !a.clashes() {
                return a;
            }
        }
    }
}

/// `n` attribute sets (see [`Attributes::sample`]).
pub fn sample_attributes(n: usize, rng: &mut Rng, shapes: &[Shape]) -> Vec<Attributes> {
    (0..n).map(|_| Attributes::sample(rng, shapes)).collect()
}

/// Every attribute combination (clashing ones included) over `shapes`, for exhaustive tests.
pub fn all_combinations(shapes: &[Shape]) -> Vec<Attributes> {
    let mut out = Vec::new();
    for &color in Color::ALL {
        for &shape in shapes {
            for &size in Size::ALL {
                for &position in Position::ALL {
                    for &background in Background::ALL {
                        out.push(Attributes { color, shape, size, position, background });
                    }
                }
            }
        }
    }
    out
}
