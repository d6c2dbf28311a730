//! The txt2img work that `benches/txt2img.rs` (criterion) and `examples/txt2img_median.rs`
//! (the side-by-side run against `benches/peer/diffusers_txt2img.py`) both time, defined once:
//! tiny-sd, 128×128, 20 DDIM steps, guidance 5, the peer's four prompts, seeds 0..batch.

use candle_core::{DType, Device};
use loragate::model::locate::resolve_model;
use loragate::model::{GenerationParams, Pipeline};

pub struct Txt2ImgWork {
    pipe: Pipeline,
    params: GenerationParams,
}

const PROMPTS: [&str; 4] = [
    "red circle, large, in the center, white background",
    "blue square, small, on the left, sunset background",
    "yellow triangle, large, at the bottom, night background",
    "purple diamond, on the right, grass background",
];

impl Txt2ImgWork {
    /// Loads the model (outside any timed loop, as in the peer measurement).
    pub fn load() -> Self {
        // As the `loragate` binary does first thing.
        loragate::device::prepare_process(loragate::device::Workload::Inference);
        let pipe = Pipeline::load(&resolve_model("tiny").unwrap(), DType::F32, &Device::Cpu).unwrap();
        let params = GenerationParams { steps: 20, guidance: 5.0, width: 128, height: 128, ..Default::default() };
        Txt2ImgWork { pipe, params }
    }

    /// Generates `batch` images in one call (the four prompts in turn).
    pub fn run(&self, batch: usize) {
        let seeds: Vec<u64> = (0..batch as u64).collect();
        let prompts: Vec<&str> = (0..batch).map(|i| PROMPTS[i % PROMPTS.len()]).collect();
        // Up to the pipeline's max_batch (8) in one UNet call, as the peer does.
        self.pipe.generate(&prompts, &seeds, &self.params, &mut |_, _| {}).unwrap();
    }
}
