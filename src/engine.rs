//! The one place onnx-micronet calls tract: the shape of every value (for counting
//! operations) and, later, runnable plans for accuracy runs.
//!
//! tract has its own (older) ONNX schema, so the model crosses over as bytes: our
//! proto is encoded (external data already inline) and decoded into
//! `tract_onnx::pb`. Shapes come from tract's analysis of the `InferenceModel`
//! with the graph's `value_info` ignored (exporters write symbolic dims there that
//! would clash with a concrete input), keyed by ONNX value name.

use std::collections::HashMap;

use prost::Message;
use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::graph::{declared_elem_type, declared_shape, Graph};
use crate::onnx::{DataType, Model};

/// The concrete input shapes to analyse the model with: the declared ones, with a
/// symbolic leading (batch) dim set to 1; `overrides` (by input position) win.
/// Any other symbolic dim without an override is an error naming the input.
pub fn input_shapes(
    model: &Model,
    overrides: &[Vec<usize>],
) -> Result<Vec<(String, Vec<usize>, i32)>> {
    let graph = Graph::new(
        model
            .proto
            .graph
            .as_ref()
            .expect("loaded models have a graph"),
    )?;
    let mut out = Vec::new();
    for (i, input) in graph.inputs().enumerate() {
        let elem = declared_elem_type(input).unwrap_or(DataType::Float as i32);
        if let Some(shape) = overrides.get(i) {
            out.push((input.name().to_string(), shape.clone(), elem));
            continue;
        }
        let dims = declared_shape(input).ok_or_else(|| {
            Error::Usage(format!(
                "input '{}' declares no shape; give one with --input-shape (e.g. 1,3,32,32)",
                input.name()
            ))
        })?;
        let mut shape = Vec::with_capacity(dims.len());
        for (axis, d) in dims.iter().enumerate() {
            match (axis, d) {
                (_, Some(v)) if *v >= 0 => shape.push(*v as usize),
                (0, _) => shape.push(1),
                _ => {
                    return Err(Error::Usage(format!(
                        "input '{}' has a symbolic dimension at axis {axis} ({}); give the shape with --input-shape (e.g. 1,3,32,32)",
                        input.name(),
                        crate::graph::shape_string(input)
                    )))
                }
            }
        }
        out.push((input.name().to_string(), shape, elem));
    }
    Ok(out)
}

fn datum_type(elem: i32) -> DatumType {
    match DataType::try_from(elem).unwrap_or(DataType::Float) {
        DataType::Uint8 => DatumType::U8,
        DataType::Int8 => DatumType::I8,
        DataType::Int32 => DatumType::I32,
        DataType::Int64 => DatumType::I64,
        DataType::Float16 => DatumType::F16,
        DataType::Double => DatumType::F64,
        _ => DatumType::F32,
    }
}

/// Hands the model to tract (as bytes, see the module doc).
fn tract_proto(model: &Model) -> Result<tract_onnx::pb::ModelProto> {
    let bytes = model.proto.encode_to_vec();
    tract_onnx::pb::ModelProto::decode(&bytes[..])
        .map_err(|e| Error::Usage(format!("tract cannot decode the model: {e}")))
}

fn tract_err(model: &Model, what: &str, e: impl std::fmt::Display) -> Error {
    let file = model
        .path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "model".into());
    Error::Usage(format!("{file}: {what}: {e}"))
}

/// The concrete shape of every value tract can determine, by ONNX value name,
/// for the given input shapes (from [`input_shapes`]).
pub fn value_shapes(
    model: &Model,
    inputs: &[(String, Vec<usize>, i32)],
) -> Result<HashMap<String, Vec<usize>>> {
    let proto = tract_proto(model)?;
    let onnx = tract_onnx::onnx().with_ignore_value_info(true);
    let parsed = onnx
        .parse(&proto, None)
        .map_err(|e| tract_err(model, "tract cannot load the model", format!("{e:#}")))?;
    let mut m = parsed.model;
    for (i, (_, shape, elem)) in inputs.iter().enumerate() {
        m.set_input_fact(i, InferenceFact::dt_shape(datum_type(*elem), shape))
            .map_err(|e| tract_err(model, "setting the input shape", e))?;
    }
    m.analyse(false)
        .map_err(|e| tract_err(model, "shape inference failed", format!("{e:#}")))?;
    let mut out = HashMap::new();
    for (name, outlet) in parsed.outlets_by_name {
        let Ok(fact) = m.outlet_fact(outlet) else {
            continue;
        };
        if let Ok(Some(dims)) = fact.shape.as_concrete_finite() {
            out.insert(name, dims.to_vec());
        }
    }
    Ok(out)
}
