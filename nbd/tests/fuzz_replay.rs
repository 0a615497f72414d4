//! Stable-toolchain stand-in for the cargo-fuzz targets (`nbd/fuzz/`):
//! replay the committed corpus (`nbd/fuzz/corpus/<target>/`) through the
//! same entry points, then proptest's random and mutated inputs.

use std::path::Path;

use proptest::prelude::*;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.expect("dir entry").path()).expect("corpus file"))
        .collect();
    out.sort();
    assert!(out.len() >= 5, "corpus {target} has {} inputs", out.len());
    out
}

/// A corpus input with some bytes replaced and maybe cut short.
fn mutated(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = corpus(target);
    (
        0..seeds.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        any::<prop::sample::Index>(),
    )
        .prop_map(move |(i, edits, cut)| {
            let mut v = seeds[i].clone();
            for (at, b) in edits {
                if !v.is_empty() {
                    let k = at.index(v.len());
                    v[k] = b;
                }
            }
            let keep = cut.index(v.len() + 1);
            v.truncate(keep.max(v.len() / 2));
            v
        })
}

/// For each fuzz target (an entry point of `nbd::fuzz`, and the name of its
/// corpus folder), a module of tests: its corpus replayed, then proptest's
/// random and mutated inputs.
macro_rules! replay_targets {
    ($($target:ident),*) => {$(
        mod $target {
            use super::*;

            #[test]
            fn corpus_replays() {
                for s in corpus(stringify!($target)) {
                    nbd::fuzz::$target(&s);
                }
            }

            proptest! {
                #![proptest_config(ProptestConfig::with_cases(2000))]

                #[test]
                fn random(data in prop::collection::vec(any::<u8>(), 0..600)) {
                    nbd::fuzz::$target(&data);
                }

                #[test]
                fn mutated_corpus(data in mutated(stringify!($target))) {
                    nbd::fuzz::$target(&data);
                }
            }
        }
    )*};
}

replay_targets!(server_stream, client_stream);
