//! The architectures, one file per component, configs as plain structs read from
//! `config.json`: the SD [`unet`], [`vae`] and [`text_encoder`], the noise [`scheduler`]s and the
//! [`clip`] towers of a CLIP scorer.

pub mod clip;
pub mod scheduler;
pub mod text_encoder;
pub mod unet;
pub mod vae;
