//! Where weights and configs come from: [`locate`] turns what a user wrote into files (built-in
//! names, folders, single files, hub-cache ids), [`loading`] reads diffusers folders,
//! [`single_file`] converts A1111/ComfyUI checkpoints with the [`ldm`] key names,
//! [`folder_writer`] writes a converted file as a diffusers folder, and [`tokenizer`] reads
//! CLIP's BPE vocabularies.

pub mod folder_writer;
pub mod ldm;
pub mod ldm_config;
pub mod loading;
pub mod locate;
pub mod single_file;
pub mod tokenizer;
