//! Names that become path components under `out/` and `baselines/`.
//!
//! Suite, case, identity-group, variant, model and LoRA names all end up as folder or file
//! names. [`SafeName`] can only be built by validation ([`SafeName::new`]) or by turning any
//! text into a safe form ([`SafeName::slug`]), so a value of this type can never escape the
//! folder it is joined to: no separators, no `..`, no leading dot or dash, nothing but ASCII
//! letters, digits and `-_.+`, at most 100 characters.

use std::fmt;
use std::path::{Path, PathBuf};

/// A validated single path component. See the module docs for the rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct SafeName(String);

const MAX_LEN: usize = 100;

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+')
}

impl SafeName {
    /// Validates `name`; the error says what is wrong, to be put after "name `x` ".
    pub fn new(name: &str) -> Result<SafeName, String> {
        if name.is_empty() {
            return Err("is empty".into());
        }
        if name.contains("..") {
            return Err("contains `..`".into());
        }
        if name.contains(['/', '\\', ':']) {
            return Err("contains a path separator".into());
        }
        if name.len() > MAX_LEN {
            return Err(format!("is longer than {MAX_LEN} characters"));
        }
        if let Some(c) = name.chars().find(|c| !allowed(*c)) {
            return Err(format!("contains {c:?}; use letters, digits, `-`, `_`, `.` and `+`"));
        }
        if name.starts_with(['.', '-']) {
            return Err("starts with `.` or `-`".into());
        }
        Ok(SafeName(name.to_string()))
    }

    /// `name` itself when it is safe; otherwise a readable slug of it with a short hash of the
    /// original appended, so that two different names never share a slug (`../x/evil` and
    /// `x/evil` differ).
    pub fn slug(name: &str) -> SafeName {
        if let Ok(n) = SafeName::new(name) {
            return n;
        }
        let mut s: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c.to_ascii_lowercase() } else { '-' }).collect();
        while s.contains("--") {
            s = s.replace("--", "-");
        }
        let s = s.trim_matches('-');
        let hash = &crate::fsutil::content_hash(name.as_bytes())[..8];
        let head: String = s.chars().take(MAX_LEN - 9).collect();
        let head = head.trim_end_matches('-');
        let out = if head.is_empty() { format!("x-{hash}") } else { format!("{head}-{hash}") };
        SafeName::new(&out).expect("a slug is made of allowed characters only")
    }

    /// A readable label for a model as a suite writes it: built-in names and plain names stay
    /// as they are; Hugging Face ids become `org--name` (as the hub cache spells them); paths
    /// become the last component plus a hash of the whole path.
    pub fn for_model(written: &str) -> SafeName {
        if let Ok(n) = SafeName::new(written) {
            return n;
        }
        let looks_like_hub_id = !written.starts_with(['.', '/', '~'])
            && written.matches('/').count() == 1
            && !Path::new(written).exists()
            && !written.ends_with(".safetensors");
        if looks_like_hub_id {
            let (id, rev) = written.split_once('@').map(|(a, b)| (a, Some(b))).unwrap_or((written, None));
            let mut label = id.replace('/', "--");
            if let Some(r) = rev {
                label.push('@');
                label.push_str(r);
            }
            if let Ok(n) = SafeName::new(&label.replace('@', "+")) {
                return n;
            }
        }
        let trimmed = written.trim_end_matches(['/', '\\']);
        let last = Path::new(trimmed).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let hash = &crate::fsutil::content_hash(written.as_bytes())[..8];
        let base = SafeName::slug(&last);
        // The slug may already carry a hash; the label is always `<readable>-<hash of the path>`.
        let readable: String = base.0.chars().take(MAX_LEN - 9).collect();
        SafeName::new(&format!("{}-{hash}", readable.trim_end_matches('-'))).unwrap_or_else(|_| SafeName::slug(written))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `dir/<name>`: the only way a name is joined to a folder.
    pub fn under(&self, dir: &Path) -> PathBuf {
        dir.join(&self.0)
    }
}

impl fmt::Display for SafeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for SafeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for SafeName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<String> for SafeName {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<&str> for SafeName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hostile_names_are_refused() {
        for bad in ["", "..", "../x", "a/b", "a\\b", "c:", ".hidden", "-flag", "a b", "é", "a..b", &"x".repeat(101)] {
            assert!(SafeName::new(bad).is_err(), "{bad:?} must be refused");
        }
        for good in ["portrait", "tiny-sticker", "order-2", "+0", "w0.5", "zorb+sticker", "192x192", "a_b"] {
            assert_eq!(SafeName::new(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn model_labels_are_safe_and_tell_paths_apart() {
        assert_eq!(SafeName::for_model("tiny").as_str(), "tiny");
        assert_eq!(SafeName::for_model("stabilityai/sdxl-base").as_str(), "stabilityai--sdxl-base");
        assert_eq!(SafeName::for_model("org/name@v2").as_str(), "org--name+v2");
        let evil = SafeName::for_model("../../../../../../tmp/evil");
        assert!(evil.as_str().starts_with("evil-"), "{evil}");
        let other = SafeName::for_model("./tmp/evil");
        assert_ne!(evil, other, "two paths to folders of one name get different labels");
        let a = SafeName::for_model("models/a.safetensors");
        let b = SafeName::for_model("models/b.safetensors");
        assert!(a.as_str().starts_with("a-") && b.as_str().starts_with("b-") && a != b, "{a} {b}");
    }

    proptest! {
        /// Whatever the text, a slug or model label is one plain component inside its folder.
        #[test]
        fn slugs_never_escape(s in "\\PC{0,300}") {
            for n in [SafeName::slug(&s), SafeName::for_model(&s)] {
                prop_assert!(SafeName::new(n.as_str()).is_ok(), "{n}");
                let p = n.under(Path::new("base"));
                prop_assert_eq!(p.parent(), Some(Path::new("base")));
                prop_assert_eq!(p.components().count(), 2);
            }
        }
    }
}
