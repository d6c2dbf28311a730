//! Choosing where tensors live: `--device cpu`, `cuda`, `cuda:N`.

/// The device and dtype handles the rest of the crate passes around without computing on them.
pub use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// What a process mostly does, which decides how its allocator is tuned ([`tune_allocator`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Generation, suites, benchmarks of inference: batches run as two row groups at once.
    Inference,
    /// LoRA training: autograd allocates and frees across threads.
    Training,
}

/// What every entry point (the CLI, benchmarks, examples) calls first, before any thread
/// starts: [`tune_allocator`], for training [`one_candle_thread`], then [`pin_thread_counts`]
/// (which starts rayon's pool, the process's first threads).
pub fn prepare_process(workload: Workload) {
    tune_allocator(workload);
    if workload == Workload::Training {
        one_candle_thread();
    }
    pin_thread_counts();
}

/// Sets `CANDLE_NUM_THREADS=1` unless it is set: candle's pool for element-wise ops
/// spin-waits for its workers, and when other processes compete for the cores (CI runners,
/// builds) that waiting costs more than the ops (a training step measured 4× slower on a busy
/// 2-core machine). Matrix products still use every core. Training takes it (`loragate train`,
/// the training benchmarks), through [`prepare_process`], before any thread exists.
fn one_candle_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called from `prepare_process` before `pin_thread_counts` starts rayon's pool,
        // the process's first threads: no other thread can read the environment now.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

/// Blocks up to this size come from malloc's heap rather than a fresh `mmap` each.
pub const HEAP_BLOCK_LIMIT: usize = 32 << 20;
/// Free memory at the top of the heap beyond this goes back to the OS.
pub const HEAP_KEEP_FREE: usize = 32 << 20;

/// Tunes glibc's malloc for tensor work; a no-op on other C libraries.
///
/// - Arenas ([`arenas_for`]): one for training, two for inference. By default each thread
///   that allocates gets its own, and freed tensor-sized blocks stay mapped in whichever arena
///   held them: the portrait suite's peak resident memory measured 293 MB that way and 249-257
///   MB with one arena, a training run 509 MB with two arenas against 349 MB with one. But
///   inference runs its two row groups ([`crate::model::row_groups`]) on two threads at once,
///   and with one arena each thread's new tensors were the blocks the other thread had just
///   freed, their cache lines still in the other core: zeroing them took 14 % of a UNet call
///   (4 % with two arenas), and a tiny-sd UNet call at 8 rows took 44-46 ms against 36-38 ms
///   whenever the two vCPUs sat far apart (about 2 % apart otherwise; alternating runs). The
///   portrait suite's peak: 289 MB with two arenas, 271-273 MB with one (before the VAE went
///   image by image, which brought it to 218 MB).
/// - Tensor-sized blocks are reused from the heap instead of mapped and unmapped per
///   allocation ([`HEAP_BLOCK_LIMIT`], [`HEAP_KEEP_FREE`]). glibc maps every block over its
///   threshold afresh and gives the heap's free top back past a second threshold, so each
///   activation buffer page-faulted its memory in again: about 3,700 faults per tiny-sd UNet
///   call at batch 8 (≈ 700 with these limits), 52.8 → 48.2 ms per call (medians of 7
///   alternating runs). Both limits at 32 MB keep the portrait suite's peak where it was
///   (258 MB against 257 MB); a 512 MB free top grew it to 285 MB, 64 MB blocks to 274 MB.
pub fn tune_allocator(workload: Workload) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets tuning parameters; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas_for(workload) as libc::c_int);
        libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, HEAP_KEEP_FREE as libc::c_int);
    }
}

/// glibc malloc arenas for `workload`: one per row group for inference, one for training.
pub fn arenas_for(workload: Workload) -> usize {
    match workload {
        Workload::Inference => 2,
        Workload::Training => 1,
    }
}

/// candle asks the OS for its thread count on every matrix product (it reads /proc/cpuinfo and
/// CPU masks each time, a quarter of a tiny-sd generation on 2 cores), unless
/// `RAYON_NUM_THREADS` says it. This pins that variable once to the count candle would find,
/// and builds rayon's global pool (loragate's own kernels) with every logical CPU as before.
/// Call it first thing, before any thread starts. An explicit `RAYON_NUM_THREADS` wins.
pub fn pin_thread_counts() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let candles = candle_core::utils::get_num_threads();
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: called at the start of `cli::run` (through `prepare_process`), before any thread
    // exists: the pool below is built after this.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", candles.to_string()) };
    let _ = rayon::ThreadPoolBuilder::new().num_threads(logical).build_global();
}

/// Parses a `--device` value. CUDA needs a build with the `cuda` feature and a visible GPU;
/// either missing is a clear error, never a silent fall-back to the CPU.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map_err(|_| Error::invalid(format!("bad device `{s}`: use cuda:N")))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::invalid(format!(
                    "device `{s}` asked for, but this loragate was built without CUDA \
                     (rebuild with `--features cuda`, see docs/gpu.md)"
                )));
            }
            // candle's CUDA errors carry a backtrace in their text: the first line is the news.
            Device::new_cuda(ordinal).map_err(|e| {
                let e = e.to_string();
                Error::invalid(format!("device `{s}` is not usable: {}", e.lines().next().unwrap_or_default()))
            })
        }
        other => Err(Error::invalid(format!("unknown device `{other}` (use cpu, cuda or cuda:N)"))),
    }
}

/// Parses a `--dtype` value; the CPU computes in f32 only.
pub fn parse_dtype(spec: &str, device: &Device) -> Result<DType> {
    let dtype = match spec {
        "f32" | "fp32" | "float32" => DType::F32,
        "f16" | "fp16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => return Err(Error::invalid(format!("unknown dtype `{other}` (use f32, f16 or bf16)"))),
    };
    if device.is_cpu() && dtype != DType::F32 {
        return Err(Error::invalid(format!("{spec} compute needs a GPU; on the CPU loragate computes in f32")));
    }
    Ok(dtype)
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// A short label for baselines and metadata: `cpu`, `cuda`.
pub fn device_class(d: &Device) -> &'static str {
    if d.is_cuda() {
        "cuda"
    } else if d.is_metal() {
        "metal"
    } else {
        "cpu"
    }
}

/// The compute label of a run: `f16`, or `f16+vae-f32` when the VAE decodes in f32. It goes
/// into cache keys and generation records (the VAE's dtype changes pixels).
pub fn compute_name(dtype: DType, vae_dtype: Option<DType>) -> String {
    match vae_dtype {
        Some(v) if v != dtype => format!("{}+vae-{}", dtype_name(dtype), dtype_name(v)),
        _ => dtype_name(dtype).to_string(),
    }
}

/// Parses `--vae-dtype`: `f32` (or the compute dtype itself, which changes nothing).
pub fn parse_vae_dtype(spec: &str, device: &Device) -> Result<DType> {
    parse_dtype(spec, device)
}
