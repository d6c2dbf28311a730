//! `device::pin_thread_counts` and `device::prepare_process`, alone in their test binary: they
//! change the process environment, which no other test may read at the same time.

#[test]
fn candles_thread_count_is_pinned_once_and_our_pool_keeps_every_cpu() {
    // SAFETY: the only test in this binary; nothing else reads the environment now.
    unsafe { std::env::remove_var("RAYON_NUM_THREADS") };
    let candle_would_find = candle_core::utils::get_num_threads();
    loragate::device::pin_thread_counts();
    assert_eq!(std::env::var("RAYON_NUM_THREADS").unwrap(), candle_would_find.to_string());
    assert_eq!(candle_core::utils::get_num_threads(), candle_would_find, "the same count, now without asking the OS");
    let logical = std::thread::available_parallelism().unwrap().get();
    assert_eq!(rayon::current_num_threads(), logical, "loragate's own kernels keep every logical CPU");
    // An explicit value wins.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", "7") };
    loragate::device::pin_thread_counts();
    assert_eq!(std::env::var("RAYON_NUM_THREADS").unwrap(), "7");
    // Training (`loragate train`, the training benchmarks) keeps candle's spin-waiting
    // element-wise pool to one thread, set by `prepare_process` itself, before it starts any
    // thread, rather than later by the subcommand; an explicit value wins.
    unsafe { std::env::remove_var("CANDLE_NUM_THREADS") };
    loragate::device::prepare_process(loragate::device::Workload::Inference);
    assert!(std::env::var_os("CANDLE_NUM_THREADS").is_none(), "inference keeps candle's default");
    loragate::device::prepare_process(loragate::device::Workload::Training);
    assert_eq!(std::env::var("CANDLE_NUM_THREADS").unwrap(), "1");
    unsafe { std::env::set_var("CANDLE_NUM_THREADS", "3") };
    loragate::device::prepare_process(loragate::device::Workload::Training);
    assert_eq!(std::env::var("CANDLE_NUM_THREADS").unwrap(), "3");
}
