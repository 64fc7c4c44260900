//! Compiles `proto/onnx.proto` into prost types with protox (a pure-Rust protobuf
//! compiler), so building needs no system `protoc`.

fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let descriptors = protox::compile(["onnx.proto"], ["proto"]).unwrap_or_else(|e| {
        panic!("proto/onnx.proto does not compile: {e}");
    });
    prost_build::Config::new()
        // Tensor payloads decode as slices of the input buffer (no copy when the
        // buffer is itself `Bytes`, e.g. a memory-mapped file).
        .bytes([".onnx.TensorProto.raw_data"])
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("prost-build failed on proto/onnx.proto: {e}"));
}
