//! Running a model: the generation [`pipeline`] and the [`clip`] model a scorer embeds with.

pub mod clip;
pub mod pipeline;
