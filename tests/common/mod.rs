//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use loragate::model::Pipeline;
use loragate::model::locate::resolve_model;
use loragate::tensors::TensorFile;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    repo().join("tests").join("fixtures")
}

/// The embedded tiny-sd pipeline, f32 on the CPU.
pub fn tiny() -> Pipeline {
    Pipeline::load(&resolve_model("tiny").unwrap(), DType::F32, &Device::Cpu).unwrap()
}

pub fn fixture(name: &str) -> Tensor {
    let f = TensorFile::load(fixtures().join("parity").join("parity.safetensors"), DType::F32, &Device::Cpu).unwrap();
    let t = f.tensors.get(name).unwrap_or_else(|| panic!("no fixture {name}")).clone();
    if t.dtype() == DType::I64 { t } else { t.to_dtype(DType::F32).unwrap() }
}

pub fn parity_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("parity").join("parity.json")).unwrap()).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

pub fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap()
}

pub fn shared_loras() -> PathBuf {
    repo().join("assets").join("loras")
}

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
pub mod actionlint;
pub mod junit_schema;
