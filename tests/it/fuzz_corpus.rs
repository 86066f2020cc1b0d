//! The fuzz corpora replayed on the stable toolchain: every file under `fuzz/corpus/<target>/`
//! goes through the same function its cargo-fuzz target calls (`fuzz/harness.rs`, shared word for
//! word), so a crash the fuzzer once found, or an input that reached new code, stays covered by
//! `cargo test` without nightly. Each input must come back, without a panic, within a bound.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::path::Path;
use std::time::{Duration, Instant};

/// Far above any input's time in a debug build (the slowest, a PFX with a million key-derivation
/// iterations, takes a few seconds); an input past it is a hang, not a slow machine.
const PER_INPUT: Duration = Duration::from_secs(30);

#[test]
fn every_committed_corpus_file_replays_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut replayed = 0;
    for (target, run) in harness::TARGETS {
        let dir = root.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} holds no corpus", dir.display());
        for file in files {
            let data = std::fs::read(&file).expect("a corpus file");
            let started = Instant::now();
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                panic!("{target}: {} panicked", file.display());
            }
            let took = started.elapsed();
            assert!(
                took < PER_INPUT,
                "{target}: {} took {took:?}",
                file.display()
            );
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} corpus files");
}
