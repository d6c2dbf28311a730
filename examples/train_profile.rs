use std::time::Instant;
use candle_core::{DType, Device, Tensor};
use loragate::model::{Pipeline, resolve::resolve_model};
use loragate::model::noise::Rng;
use loragate::train::network::{Network, select_layers};
fn main() {
    let pipe = Pipeline::load(&resolve_model("tiny").unwrap(), DType::F32, &Device::Cpu).unwrap();
    let b = 4;
    let x = Tensor::randn(0f32, 1., (b, 4, 16, 16), &Device::Cpu).unwrap();
    let ts = Tensor::full(500f32, b, &Device::Cpu).unwrap();
    let ctx = Tensor::randn(0f32, 1., (b, 77, 192), &Device::Cpu).unwrap();
    let targets: Vec<String> = ["to_q", "to_k", "to_v", "to_out.0"].iter().map(|s| s.to_string()).collect();
    let layers = select_layers(pipe.targets(), &targets).unwrap();
    let net = Network::new(&layers, 8, 8.0, &mut Rng::new(1), DType::F32, &Device::Cpu).unwrap();
    let mode = std::env::args().nth(1).unwrap_or_default();
    if mode != "fwd" { net.attach(); }
    let _mode = std::env::args().nth(1).unwrap_or_default();
    let n: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let o = pipe.unet.forward(&x, &ts, &ctx, None).unwrap();
    let l = o.sqr().unwrap().mean_all().unwrap();
    println!("{} tracked nodes", l.sorted_nodes().len());
    let cpu = || { let s = std::fs::read_to_string("/proc/self/stat").unwrap(); let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect(); (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0 };
    let c0 = cpu();
    let t = Instant::now();
    for _ in 0..n {
        let o = pipe.unet.forward(&x, &ts, &ctx, None).unwrap();
        let l = o.sqr().unwrap().mean_all().unwrap();
        if mode == "full" { l.backward().unwrap(); }
    }
    println!("{mode} {:?} wall, {:.3} s cpu per step", t.elapsed() / n as u32, (cpu() - c0) / n as f64);
}
