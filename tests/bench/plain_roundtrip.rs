//! The baseline of `make bench`: a plain protobuf round trip of an ONNX file.
//!
//!     cargo run --release --example plain_roundtrip -- IN.onnx OUT.onnx   (declared in Cargo.toml)
//!
//! Reads the whole file into a `Vec`, decodes it with the crate's generated prost
//! types, encodes it again and writes it. Nothing else: no memory map, no external
//! data (a model with external data round-trips its model file only), no checks,
//! no temporary file, no fsync. This is what `onnx-micronet convert` costs
//! compared with the simplest correct program.

use std::process::ExitCode;

use onnx_micronet::onnx::proto::ModelProto;
use prost::Message;

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let [input, output] = args.as_slice() else {
        eprintln!("usage: plain_roundtrip IN.onnx OUT.onnx");
        return ExitCode::from(2);
    };
    let bytes = match std::fs::read(input) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {}: {e}", input.to_string_lossy());
            return ExitCode::FAILURE;
        }
    };
    let model = match ModelProto::decode(&bytes[..]) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {}: {e}", input.to_string_lossy());
            return ExitCode::FAILURE;
        }
    };
    let encoded = model.encode_to_vec();
    if let Err(e) = std::fs::write(output, &encoded) {
        eprintln!("error: {}: {e}", output.to_string_lossy());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
