//! Where a model's parameters come from, addressed by state-dict prefixes.
//!
//! Model code asks for `params.pp("down_blocks").pp(0).get("conv.weight", shape)`; the store
//! answers from a safetensors file (checking the shape, and naming file and key on any problem)
//! or, for tests of full-size architectures without real weights, with seeded random values.
//! Every `Linear`/`Conv2d` built through a [`Params`] is registered as a LoRA target.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::adapters::{AdaptableLayer, AdapterTargets};
use crate::model::noise::Rng;

/// How a random store initialises a parameter it is asked for.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Zeros,
    Ones,
    /// Normal with standard deviation `1/sqrt(fan_in)`.
    FanIn(usize),
    /// Normal with this standard deviation.
    Normal(f64),
}

enum Source {
    Tensors(HashMap<String, Tensor>),
    Random(RefCell<Rng>),
    /// Answers every request with a zero-cost placeholder and remembers what was asked for:
    /// the parameter names and shapes an architecture needs, without allocating it.
    Record(RefCell<Vec<(String, Vec<usize>)>>),
}

/// The parameters of one model component (UNet, VAE, text encoder...).
pub struct WeightStore {
    origin: PathBuf,
    source: Source,
    device: Device,
    dtype: DType,
    used: RefCell<BTreeSet<String>>,
}

impl WeightStore {
    pub fn from_tensors(origin: impl AsRef<Path>, tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        WeightStore {
            origin: origin.as_ref().to_path_buf(),
            source: Source::Tensors(tensors),
            device: device.clone(),
            dtype,
            used: RefCell::new(BTreeSet::new()),
        }
    }

    /// Seeded random parameters: for tests and benchmarks of full-size architectures.
    pub fn random(seed: u64, dtype: DType, device: &Device) -> Self {
        WeightStore {
            origin: PathBuf::from(format!("<random weights, seed {seed}>")),
            source: Source::Random(RefCell::new(Rng::new(seed))),
            device: device.clone(),
            dtype,
            used: RefCell::new(BTreeSet::new()),
        }
    }

    /// A store that records names and shapes (see [`WeightStore::recorded`]).
    pub fn recorder(device: &Device) -> Self {
        WeightStore {
            origin: PathBuf::from("<recorder>"),
            source: Source::Record(RefCell::new(Vec::new())),
            device: device.clone(),
            dtype: DType::F32,
            used: RefCell::new(BTreeSet::new()),
        }
    }

    /// The names and shapes a recorder was asked for, in order.
    pub fn recorded(&self) -> Vec<(String, Vec<usize>)> {
        match &self.source {
            Source::Record(r) => r.borrow().clone(),
            _ => Vec::new(),
        }
    }

    pub fn origin(&self) -> &Path {
        &self.origin
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Tensors(t) => t.contains_key(name),
            Source::Random(_) | Source::Record(_) => true,
        }
    }

    fn get(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.used.borrow_mut().insert(name.to_string());
        match &self.source {
            Source::Tensors(tensors) => {
                let t = tensors.get(name).ok_or_else(|| {
                    Error::model(&self.origin, format!("missing tensor `{name}` (expected shape {shape:?})"))
                })?;
                if t.dims() != shape {
                    // Old checkpoints store 1×1 convolutions where new code has linear layers
                    // (and the reverse): same numbers, other shape.
                    if t.elem_count() == shape.iter().product::<usize>() && is_unit_reshape(t.dims(), shape) {
                        return Ok(t.reshape(shape)?.to_dtype(self.dtype)?.to_device(&self.device)?);
                    }
                    return Err(Error::model(
                        &self.origin,
                        format!("tensor `{name}` has shape {:?}, the config implies {shape:?}", t.dims()),
                    ));
                }
                Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
            }
            Source::Record(r) => {
                r.borrow_mut().push((name.to_string(), shape.to_vec()));
                Ok(Tensor::zeros((), self.dtype, &self.device)?.broadcast_as(shape)?)
            }
            Source::Random(rng) => {
                let n: usize = shape.iter().product();
                // Uniform with the wanted standard deviation: as good as normal for shape and
                // speed tests, and several times faster to draw for billions of parameters.
                let uniform = |std: f64, rng: &mut Rng| -> Vec<f32> {
                    let a = std * 3f64.sqrt();
                    (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * a) as f32).collect()
                };
                let data: Vec<f32> = match init {
                    Init::Zeros => vec![0.0; n],
                    Init::Ones => vec![1.0; n],
                    Init::FanIn(fan_in) => uniform(1.0 / (fan_in.max(1) as f64).sqrt(), &mut rng.borrow_mut()),
                    Init::Normal(std) => uniform(std, &mut rng.borrow_mut()),
                };
                Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(self.dtype)?.to_device(&self.device)?)
            }
        }
    }

    /// Tensors of the file that no layer asked for (empty for random stores).
    pub fn unused(&self) -> Vec<String> {
        match &self.source {
            Source::Tensors(t) => {
                let used = self.used.borrow();
                let mut v: Vec<String> = t.keys().filter(|k| !used.contains(*k)).cloned().collect();
                v.sort();
                v
            }
            Source::Random(_) | Source::Record(_) => Vec::new(),
        }
    }
}

/// True when two shapes differ only by trailing/leading 1s (a 1×1 conv vs a linear weight).
fn is_unit_reshape(a: &[usize], b: &[usize]) -> bool {
    let strip = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
    strip(a) == strip(b)
}

/// A view of a [`WeightStore`] at a key prefix, plus the registry of LoRA targets.
#[derive(Clone)]
pub struct Params<'a> {
    store: &'a WeightStore,
    targets: &'a RefCell<AdapterTargets>,
    prefix: String,
}

impl<'a> Params<'a> {
    /// The root of a component: keys are looked up as written, layers register under their keys.
    pub fn root(store: &'a WeightStore, targets: &'a RefCell<AdapterTargets>) -> Self {
        Params { store, targets, prefix: String::new() }
    }

    /// Descends one level: `pp("down_blocks").pp(0)` addresses `down_blocks.0.`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Params<'a> {
        Params { store: self.store, targets: self.targets, prefix: self.key(&name.to_string()) }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}.{}", self.prefix, name) }
    }

    pub fn get(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.store.get(&self.key(name), shape, init)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.key(name))
    }

    pub fn device(&self) -> &Device {
        self.store.device()
    }

    pub fn dtype(&self) -> DType {
        self.store.dtype()
    }

    /// Registers a patchable layer (under its own path).
    pub fn register(&self, layer: std::sync::Arc<AdaptableLayer>) {
        self.targets.borrow_mut().register(layer);
    }
}
