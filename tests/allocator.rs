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

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn threads_that_allocate_at_once_share_one_arena() {
    loragate::device::tune_allocator();
    // The test harness's threads allocated before the call; no arena may be added after it.
    let arenas = arena_count();
    // Four threads allocating at the same time: by default each would get an arena of its own.
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
    assert_eq!(arena_count(), arenas, "new threads got arenas of their own");
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
    use loragate::device::{HEAP_BLOCK_LIMIT, HEAP_KEEP_FREE};
    loragate::device::tune_allocator();
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
