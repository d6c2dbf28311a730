use std::time::Instant;
use candle_core::{DType, Device, Tensor};
use loragate::model::{Pipeline, GenerationParams, resolve::resolve_model};
fn main() {
    let t = Instant::now();
    let pipe = Pipeline::load(&resolve_model("tiny").unwrap(), DType::F32, &Device::Cpu).unwrap();
    println!("load {:?}", t.elapsed());
    for b in [2usize, 8] {
        let x = Tensor::randn(0f32, 1., (b, 4, 16, 16), &Device::Cpu).unwrap();
        let ts = Tensor::full(500f32, b, &Device::Cpu).unwrap();
        let ctx = Tensor::randn(0f32, 1., (b, 77, 192), &Device::Cpu).unwrap();
        pipe.unet.forward(&x, &ts, &ctx, None).unwrap();
        let t = Instant::now();
        for _ in 0..10 { pipe.unet.forward(&x, &ts, &ctx, None).unwrap(); }
        println!("unet b{b} {:?}", t.elapsed() / 10);
        let z = Tensor::randn(0f32, 1., (b / 2, 4, 16, 16), &Device::Cpu).unwrap();
        let t = Instant::now();
        pipe.vae.decode(&z).unwrap();
        println!("vae b{} {:?}", b / 2, t.elapsed());
    }
    let t = Instant::now();
    pipe.encode_prompts(&["red circle, large"; 4], 1).unwrap();
    println!("te b4 {:?}", t.elapsed());
    for b in [1usize, 4] {
        let p = vec!["red circle, large, in the center, white background"; b];
        let seeds: Vec<u64> = (0..b as u64).collect();
        let t = Instant::now();
        pipe.generate(&p, &seeds, &GenerationParams::default(), &mut |_, _| {}).unwrap();
        println!("txt2img b{b} {:?}", t.elapsed());
    }
}
