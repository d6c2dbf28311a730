//! The architectures, one file per component, configs as plain structs read from
//! `config.json`: the SD [`unet`], [`vae`] and [`text_encoder`], the noise [`scheduler`]s and the
//! [`clip`] towers of a CLIP scorer, the [`dinov2`] image encoder of the identity scorer and the
//! LAION [`aesthetic`] predictor.

pub mod aesthetic;
pub mod clip;
pub mod dinov2;
pub mod scheduler;
pub mod text_encoder;
pub mod unet;
pub mod vae;
