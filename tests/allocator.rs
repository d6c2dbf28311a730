//! `device::tune_allocator`, alone in its test binary: it tunes the whole process's allocator.

/// How many arenas glibc's malloc has, from its own report (`malloc_info`, one `<heap>` each).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn arena_count() -> usize {
    let path = std::env::temp_dir().join(format!("loragate-malloc-info-{}.xml", std::process::id()));
    let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a FILE opened, written by malloc_info and closed here; both strings are valid C strings.
    unsafe {
        let file = libc::fopen(c_path.as_ptr(), c"w".as_ptr());
        assert!(!file.is_null(), "cannot open {}", path.display());
        assert_eq!(libc::malloc_info(0, file), 0);
        libc::fclose(file);
    }
    let report = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    report.matches("<heap nr=").count()
}

/// Four threads that allocate at the same time, then free; by default each would get an arena
/// of its own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn four_threads_allocate_at_once() {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let blocks: Vec<Vec<u8>> = (0..64).map(|i| vec![(t + i) as u8; 64 * 1024]).collect();
                barrier.wait();
                blocks.len()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 64);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn arenas_are_capped_per_workload() {
    use loragate::device::{Workload, arenas_for, tune_allocator};
    // Training first (one arena: the test harness's threads may have made more before the
    // call, but no thread may add one after it), then inference (two).
    tune_allocator(Workload::Training);
    let before = arena_count();
    four_threads_allocate_at_once();
    assert_eq!(arena_count(), before, "training: new threads got arenas of their own");
    assert_eq!(arenas_for(Workload::Training), 1);
    tune_allocator(Workload::Inference);
    four_threads_allocate_at_once();
    let after = arena_count();
    assert!(after <= before.max(arenas_for(Workload::Inference)), "inference: {after} arenas (cap {})", arenas_for(Workload::Inference));
    assert_eq!(arenas_for(Workload::Inference), 2);
}

/// Minor page faults of the calling thread so far.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn thread_page_faults() -> i64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
        usage.ru_minflt
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn freed_tensor_sized_blocks_are_reused_without_faulting_their_pages_in_again() {
    use loragate::device::{HEAP_BLOCK_LIMIT, HEAP_KEEP_FREE, Workload};
    // The block thresholds are the same for both workloads; training's one arena keeps the
    // other test's training phase valid while the two run at once.
    loragate::device::tune_allocator(Workload::Training);
    // A layer's worth of activation buffers, all live at once, then all freed, over and over.
    // Untuned, glibc maps blocks this size afresh or gives the freed heap top back (its
    // thresholds follow the largest block freed so far: 4 MB blocks, 8 MB of free top), so
    // every round faults all of its pages in again.
    let (len, count) = (HEAP_BLOCK_LIMIT / 8, 5);
    assert!(len * count < HEAP_KEEP_FREE);
    let round = || {
        let blocks: Vec<Vec<u8>> = (0..count).map(|i| vec![i as u8 + 1; len]).collect();
        std::hint::black_box(&blocks);
    };
    round();
    round();
    let before = thread_page_faults();
    for _ in 0..3 {
        round();
    }
    let faults = thread_page_faults() - before;
    let pages = (3 * count * len / 4096) as i64;
    assert!(faults < pages / 10, "{faults} page faults for {pages} pages of reused blocks");
}
