//! `device::pin_thread_counts`, alone in its test binary: it changes the process environment,
//! which no other test may read at the same time.

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
}
