//! CLIP score scales. Scores are **raw cosine similarity** of L2-normalised embeddings, in
//! [−1, 1] (the embeddings come from [`crate::model::clip`]). Other tools report 100 × cosine
//! (torchmetrics' `CLIPScore`) or 2.5 × max(cosine, 0) (Hessel et al.'s CLIPScore); [`Scale`]
//! converts for display and for thresholds written in those scales.

use serde::Deserialize;

/// How a CLIP score is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scale {
    /// Raw cosine similarity in [−1, 1] (what loragate stores and compares).
    #[default]
    Cosine,
    /// 100 × cosine (torchmetrics).
    Torchmetrics,
    /// 2.5 × max(cosine, 0) (Hessel et al. 2021).
    Clipscore,
}

impl Scale {
    pub fn apply(&self, cosine: f64) -> f64 {
        match self {
            Scale::Cosine => cosine,
            Scale::Torchmetrics => 100.0 * cosine,
            Scale::Clipscore => 2.5 * cosine.max(0.0),
        }
    }

    /// The inverse of [`Scale::apply`] (for thresholds written in another scale).
    pub fn to_cosine(&self, value: f64) -> f64 {
        match self {
            Scale::Cosine => value,
            Scale::Torchmetrics => value / 100.0,
            Scale::Clipscore => value / 2.5,
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Scale::Cosine => "raw cosine",
            Scale::Torchmetrics => "100×cosine (torchmetrics)",
            Scale::Clipscore => "2.5×cosine (CLIPScore)",
        }
    }
}

