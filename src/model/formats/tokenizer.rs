//! CLIP's BPE tokenizer, from a `tokenizer.json` or from `vocab.json` + `merges.txt`.
//!
//! Two flavours exist in the wild and both are handled: OpenAI CLIP's byte-level BPE (every
//! SD 1.x/2.x/XL tokenizer folder) and plain character BPE with a `Whitespace` pre-tokenizer
//! (the shapes world's tokenizer). Words end in `</w>`. Prompts are cut at the model's context
//! (77 tokens including start and end), keeping the end token, and the caller is told.

use std::collections::HashMap;
use std::path::Path;

use regex::Regex;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::fsutil::read_text;

const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";
const WHITESPACE_PATTERN: &str = r"\w+|[^\w\s]+";

/// Tokens of one prompt, padded to the context length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Tokens of the prompt itself (without start/end) before any truncation.
    pub prompt_tokens: usize,
    /// True when the prompt did not fit and its tail was dropped.
    pub truncated: bool,
    /// Characters that have no token and were skipped.
    pub unknown: Vec<char>,
}

/// OpenAI CLIP's BPE merge list (MIT), compiled in: `assets/clip/bpe_simple_vocab_16e6.txt.gz`.
const OPENAI_CLIP_MERGES: &[u8] = include_bytes!("../../../assets/clip/bpe_simple_vocab_16e6.txt.gz");
const OPENAI_CLIP_MERGES_NAME: &str = "bpe_simple_vocab_16e6.txt.gz (built in)";

#[derive(Debug, Clone)]
pub struct Tokenizer {
    vocab: HashMap<String, u32>,
    merges: HashMap<(String, String), usize>,
    splitter: Regex,
    byte_level: bool,
    byte_map: [char; 256],
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    pub context: usize,
}

impl Tokenizer {
    /// Loads a tokenizer folder: `tokenizer.json`, else `vocab.json` + `merges.txt`. A
    /// `tokenizer_config.json` or `special_tokens_map.json` beside them may name the pad token
    /// (SD 2.x and SDXL's second tokenizer pad with `!`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let mut tok = if json.exists() {
            Self::from_tokenizer_json(&json)?
        } else if dir.join("vocab.json").exists() && dir.join("merges.txt").exists() {
            Self::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt"))?
        } else {
            return Err(Error::model(dir, "no tokenizer.json, nor vocab.json + merges.txt"));
        };
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let p = dir.join(name);
            if let Ok(text) = std::fs::read_to_string(&p)
                && let Ok(v) = serde_json::from_str::<Value>(&text) {
                    let pad = match &v["pad_token"] {
                        Value::String(s) => Some(s.clone()),
                        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
                        _ => None,
                    };
                    if let Some(pad) = pad
                        && let Some(&id) = tok.vocab.get(&pad).or_else(|| tok.vocab.get(&format!("{pad}</w>"))) {
                            tok.pad = id;
                        }
                    if let Some(n) = v["model_max_length"].as_u64()
                        && (2..=77).contains(&n) {
                            tok.context = n as usize;
                        }
                }
        }
        Ok(tok)
    }

    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let bad = |m: &str| Error::model(path, m.to_string());
        let v: Value = serde_json::from_str(&read_text(path)?).map_err(|e| bad(&format!("not JSON: {e}")))?;
        let model = &v["model"];
        if model["type"].as_str() != Some("BPE") {
            return Err(bad("only BPE tokenizers are supported"));
        }
        let mut vocab: HashMap<String, u32> = model["vocab"]
            .as_object()
            .ok_or_else(|| bad("model.vocab is missing"))?
            .iter()
            .filter_map(|(k, id)| id.as_u64().map(|id| (k.clone(), id as u32)))
            .collect();
        for t in v["added_tokens"].as_array().into_iter().flatten() {
            if let (Some(c), Some(id)) = (t["content"].as_str(), t["id"].as_u64()) {
                vocab.insert(c.to_string(), id as u32);
            }
        }
        let mut merges = Vec::new();
        for m in model["merges"].as_array().ok_or_else(|| bad("model.merges is missing"))? {
            let pair = match m {
                Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(a) if a.len() == 2 => {
                    Some((a[0].as_str().unwrap_or("").to_string(), a[1].as_str().unwrap_or("").to_string()))
                }
                _ => None,
            };
            merges.push(pair.ok_or_else(|| bad("a merge is neither \"a b\" nor [a, b]"))?);
        }
        let pre = v["pre_tokenizer"].to_string();
        let byte_level = pre.contains("ByteLevel");
        let splitter = if pre.contains("\"Whitespace\"") && !byte_level { WHITESPACE_PATTERN } else { CLIP_PATTERN };
        Self::build(path, vocab, merges, byte_level, splitter)
    }

    pub fn from_vocab_merges(vocab_path: &Path, merges_path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(&read_text(vocab_path)?)
            .map_err(|e| Error::model(vocab_path, format!("not JSON: {e}")))?;
        let vocab: HashMap<String, u32> = v
            .as_object()
            .ok_or_else(|| Error::model(vocab_path, "not a token → id map"))?
            .iter()
            .filter_map(|(k, id)| id.as_u64().map(|id| (k.clone(), id as u32)))
            .collect();
        let merges = read_text(merges_path)?
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .filter_map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect();
        Self::build(vocab_path, vocab, merges, true, CLIP_PATTERN)
    }

    /// OpenAI CLIP's tokenizer, the one single-file checkpoints (which carry none) are read
    /// with: built from the merge list compiled into the binary, so an installed loragate needs
    /// no assets folder for it. Built once per process.
    pub fn openai_clip() -> Result<Self> {
        static BUILT: std::sync::OnceLock<std::result::Result<Tokenizer, String>> = std::sync::OnceLock::new();
        BUILT
            .get_or_init(|| Self::from_clip_bpe_gz_bytes(Path::new(OPENAI_CLIP_MERGES_NAME), OPENAI_CLIP_MERGES).map_err(|e| e.to_string()))
            .clone()
            .map_err(|e| Error::model(OPENAI_CLIP_MERGES_NAME, e))
    }

    /// OpenAI CLIP's tokenizer from a gzipped merge list file (`bpe_simple_vocab_16e6.txt.gz`).
    pub fn from_clip_bpe_gz(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_clip_bpe_gz_bytes(path, &bytes)
    }

    /// The vocabulary is the 256 byte symbols, the same with `</w>`, the first 48,894 merges,
    /// then the start and end tokens (49,408 ids, as CLIP builds it).
    fn from_clip_bpe_gz_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        use std::io::Read;
        let mut text = String::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut text)
            .map_err(|e| Error::model(path, format!("not a gzipped merge list: {e}")))?;
        const MERGES: usize = 49152 - 256 - 2;
        let merges: Vec<(String, String)> = text
            .lines()
            .skip(1)
            .take(MERGES)
            .filter_map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect();
        if merges.len() != MERGES {
            return Err(Error::model(path, format!("{} merges, expected {MERGES}", merges.len())));
        }
        let mut symbols: Vec<String> = byte_symbols_in_clip_order().into_iter().map(String::from).collect();
        let with_end: Vec<String> = symbols.iter().map(|s| format!("{s}</w>")).collect();
        symbols.extend(with_end);
        symbols.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        symbols.push("<|startoftext|>".into());
        symbols.push("<|endoftext|>".into());
        let vocab = symbols.into_iter().enumerate().map(|(i, s)| (s, i as u32)).collect();
        Self::build(path, vocab, merges, true, CLIP_PATTERN)
    }

    fn build(
        path: &Path,
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        byte_level: bool,
        pattern: &str,
    ) -> Result<Self> {
        let bos = *vocab.get("<|startoftext|>").ok_or_else(|| Error::model(path, "no <|startoftext|> token"))?;
        let eos = *vocab.get("<|endoftext|>").ok_or_else(|| Error::model(path, "no <|endoftext|> token"))?;
        let merges = merges.into_iter().enumerate().map(|(i, p)| (p, i)).collect();
        Ok(Tokenizer {
            vocab,
            merges,
            splitter: Regex::new(pattern).expect("static pattern"),
            byte_level,
            byte_map: bytes_to_unicode(),
            bos,
            eos,
            pad: eos,
            context: 77,
        })
    }

    /// The vocabulary and the merges in rank order (what `vocab.json` and `merges.txt` hold).
    pub fn export_vocab_and_merges(&self) -> (std::collections::BTreeMap<String, u32>, Vec<(String, String)>) {
        let vocab = self.vocab.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let mut merges: Vec<(&(String, String), &usize)> = self.merges.iter().collect();
        merges.sort_by_key(|(_, r)| **r);
        (vocab, merges.into_iter().map(|(p, _)| p.clone()).collect())
    }

    /// BPE of one pre-tokenized word into vocabulary symbols.
    fn bpe(&self, word: &str) -> Vec<String> {
        let chars: Vec<String> = word.chars().map(|c| c.to_string()).collect();
        if chars.is_empty() {
            return Vec::new();
        }
        let mut parts = chars;
        let last = parts.len() - 1;
        parts[last].push_str("</w>");
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.merges.get(&(w[0].clone(), w[1].clone())).map(|&r| (r, i)))
                .min();
            let Some((_, i)) = best else { break };
            let merged = format!("{}{}", parts[i], parts[i + 1]);
            parts[i] = merged;
            parts.remove(i + 1);
        }
        parts
    }

    /// The prompt's own tokens (no start/end), and characters that have no token.
    pub fn tokens(&self, text: &str) -> (Vec<u32>, Vec<char>) {
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
        let mut ids = Vec::new();
        let mut unknown = Vec::new();
        for m in self.splitter.find_iter(&text) {
            let word = m.as_str();
            if let Some(&id) = self.vocab.get(word).filter(|_| word.starts_with("<|")) {
                ids.push(id);
                continue;
            }
            let mapped: String =
                if self.byte_level { word.bytes().map(|b| self.byte_map[b as usize]).collect() } else { word.to_string() };
            for sym in self.bpe(&mapped) {
                match self.vocab.get(&sym) {
                    Some(&id) => ids.push(id),
                    // CLIP vocabularies have no unknown token: a symbol can only be missing when
                    // it holds a character outside the alphabet; it is dropped and reported.
                    None => unknown.extend(sym.trim_end_matches("</w>").chars()),
                }
            }
        }
        (ids, unknown)
    }

    /// Start token, the prompt, end token, padded (or cut, keeping the end token) to the context.
    pub fn encode(&self, text: &str) -> Encoded {
        let (tokens, unknown) = self.tokens(text);
        let room = self.context - 2;
        let truncated = tokens.len() > room;
        let mut ids = Vec::with_capacity(self.context);
        ids.push(self.bos);
        ids.extend(tokens.iter().take(room));
        ids.push(self.eos);
        ids.resize(self.context, self.pad);
        Encoded { ids, prompt_tokens: tokens.len(), truncated, unknown }
    }
}

/// The byte symbols in the order CLIP's vocabulary lists them: printable bytes first, in byte
/// order, then the remapped ones.
fn byte_symbols_in_clip_order() -> Vec<char> {
    let map = bytes_to_unicode();
    let printable = |b: usize| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut out: Vec<char> = (0..256).filter(|&b| printable(b)).map(|b| map[b]).collect();
    out.extend((0..256).filter(|&b| !printable(b)).map(|b| map[b]));
    out
}

/// GPT-2/CLIP's reversible byte → printable-character map.
fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut n = 0u32;
    for b in 0..256u32 {
        map[b as usize] = if printable(b) {
            char::from_u32(b).expect("valid")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid")
        };
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip() -> Tokenizer {
        Tokenizer::openai_clip().unwrap()
    }

    #[test]
    fn clip_vocabulary_gives_openai_ids() {
        let t = clip();
        assert_eq!((t.bos, t.eos), (49406, 49407));
        // As `clip.tokenize` gives them (OpenAI CLIP README and model card examples).
        let cases: [(&str, &[u32]); 4] = [
            ("a diagram", &[320, 22697]),
            ("a dog", &[320, 1929]),
            ("a cat", &[320, 2368]),
            ("a photo of a cat", &[320, 1125, 539, 320, 2368]),
        ];
        for (text, want) in cases {
            assert_eq!(t.tokens(text).0, want, "{text}");
        }
        let e = t.encode("a dog");
        assert_eq!(&e.ids[..4], &[49406, 320, 1929, 49407]);
        assert_eq!(e.ids.len(), 77);
        assert!(e.ids[4..].iter().all(|&i| i == 49407), "SD 1.x pads with the end token");
    }

    #[test]
    fn long_prompts_keep_the_end_token_and_say_so() {
        let t = clip();
        let long = vec!["cat"; 100].join(" ");
        let e = t.encode(&long);
        assert!(e.truncated);
        assert_eq!(e.prompt_tokens, 100);
        assert_eq!(e.ids[76], 49407);
        assert_eq!(e.ids.len(), 77);
    }
}
