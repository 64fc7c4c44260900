//! Whatever loads goes through what `optimize` does in memory: inspect, BN folding and
//! magnitude pruning, scoring (tract's shape analysis), and a save. Errors are fine;
//! panics, hangs and runaway allocations are not.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use onnx_micronet::{decode_model, LoadOptions};
use onnx_micronet::passes::Context;
use onnx_micronet::passes::prune::PruneSection;
use onnx_micronet::recipe::Recipe;
use onnx_micronet::score::{self, ScoreOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(model) = decode_model(
        bytes::Bytes::copy_from_slice(data),
        Path::new("fuzz.onnx"),
        None,
        &LoadOptions::default(),
    ) else {
        return;
    };
    let _ = onnx_micronet::inspect::inspect(&model);
    let recipe = Recipe {
        prune: Some(PruneSection::from_flag("magnitude:0.5").unwrap()),
        ..Default::default()
    };
    let cx = Context {
        threads: 1,
        ..Default::default()
    };
    if let Ok((out, _)) = onnx_micronet::optimize::run(&model, &recipe, &cx) {
        let _ = score::score(&out, &ScoreOptions::default());
        let dir = std::env::temp_dir().join(format!("onnx-micronet-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let _ = onnx_micronet::onnx::save(&out, &dir.join("out.onnx"), &Default::default());
    }
    let _ = score::score(&model, &ScoreOptions::default());
});
