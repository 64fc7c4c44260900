#!/usr/bin/env python3
"""Independent MicroNet count of an ONNX image classifier, for parity with `onnx-micronet score`.

    python ref_count.py MODEL [--no-freebie] [--no-ort-check]

Prints JSON: {params, mults, adds, raw_mults, raw_adds, per_node: {name: {...}}, uncounted: [...]}.
params are 32-bit parameter units (stored bits / 32); mults and adds are 32-bit operation units;
raw_* are unweighted counts. Batch size 1.

This file is written from the spec (/work/shared/micronet-rules.md), not from the Rust code.
It does not import or call anything of onnx-micronet. It uses onnx (shape inference, tensors),
numpy, and onnxruntime (only to cross-check the inferred shapes).

Scope: float models (float32 / float16 weights). Anything quantized (QuantizeLinear,
DequantizeLinear, integer weights) is refused, because the freebie rules then change.

Where each rule comes from
--------------------------
REF = google-research micronet_challenge/counting.py, as quoted in micronet-rules.md §3.2.
NB  = micronet_challenge/EfficientNetCounting.ipynb, as quoted in micronet-rules.md §2.1 / §3.2.
RULES = the challenge's scoring_and_submission.md, as quoted in micronet-rules.md §2.1 / §3.1.
PROJECT = onnx-micronet's documented conventions for what REF lacks: the header comment and the
          activation table of src/score/count.rs (read as documentation, nothing is imported).

  rule                                                   source
  -----------------------------------------------------  ----------------------------------------
  conv (normal, 1x1, depthwise): v mults, v-1 adds/out   REF count_ops Conv2D / DepthWiseConv2D
  fully connected: c_in mults, c_in-1 adds per output    REF count_ops FullyConnected
  bias: c_out params, +1 add per output element          REF `if op.use_bias`
  grouped conv (not depthwise): v = kh*kw*c_in/group     micronet-rules.md §3.2 "natural generalization"
  output sizes from the graph's shapes                   micronet-rules.md §3.2 / §8 (not REF's formula)
  sparsity per output channel from exact zeros           PROJECT (REF has one global sparsity; with
                                                         the same zeros per channel the two agree)
  all-zero output channel: 0 mults, 0 adds (not -1)      PROJECT (count.rs saturating_sub)
  storage nnz*bits + numel (mask) if any zero            RULES bitmask rule, REF get_sparse_size
  BN after a weighted layer = one bias (once)            NB "Bias added for each batch norm ..."
  BN after a weighted layer that has a bias: free        PROJECT ("its bias counts once"), §8 table
  BN after anything else: 2C params, 1 mult + 1 add/el   PROJECT (count.rs header)
  GlobalAveragePool: C mults + (HW-1)*C adds             REF GlobalAvg
  residual Add: 1 add per output element                 REF Add (real output size, not NB quirk 1)
  Mul of two activations: 1 mult per output element      REF Scale
  relu (1,0), sigmoid (2,1)                              REF get_flops_per_activation
  swish as Sigmoid + Mul = (2,1) + (1,0) = (3,1)         REF swish (3,1), reached by node sum
  Clip / relu6 (2,0)                                     PROJECT table (EXPA; organizer note via KAIST)
  other activations: table ACTIVATIONS below             PROJECT table
  MaxPool k x k: (k*k-1) mults per output                PROJECT (comparisons counted like REF relu)
  AveragePool k x k: (k*k-1) adds + 1 mult per output    PROJECT (MSU1/MSU3 convention, §3.2)
  GlobalMaxPool: (HW-1)*C mults                          PROJECT
  ReduceMean/Sum over r values: (r-1) adds (+1 mult)     PROJECT
  Sub/Sum like Add; Div/Max/Min like Mul                 PROJECT
  constant operand of an element-wise op: its values     PROJECT (RULES "any values that are
    are parameters (dense)                               needed to perform inference")
  Reshape/Flatten/Concat/... and constant-only nodes     PROJECT (data movement is free)
  freebie: params 16/32, mults 16/32, adds 32/32         RULES freebie; NB print_summary(0, 16, 32, 16)
  no freebie (float32): everything 32/32                 RULES
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

# Per-element (mults, adds) of activation nodes.
ACTIVATIONS = {
    # REF get_flops_per_activation:
    #   if activation == 'relu': return 1, 0
    #   elif activation == 'sigmoid':  # Sigmoid: exp(x) / (1 + exp(x))
    #     return 2, 1
    "Relu": (1, 0),
    "Sigmoid": (2, 1),
    # (REF 'swish' (3, 1) has no single ONNX op: Sigmoid (2,1) + Mul (1,0) gives it.)
    # PROJECT table (src/score/count.rs default_activation_table), for ops REF lacks:
    "Clip": (2, 0),  # relu6: EXPA counter.py; organizer announcement quoted by KAIST
    "HardSwish": (4, 1),  # KAIST hswish_ops
    "HardSigmoid": (3, 1),
    "Tanh": (2, 1),
    "LeakyRelu": (2, 0),
    "PRelu": (2, 0),
    "Elu": (3, 1),
    "Selu": (4, 1),
    "Softplus": (2, 1),
    "Softmax": (2, 1),
    "LogSoftmax": (2, 1),
    "Exp": (1, 0),
    "Log": (1, 0),
    "Sqrt": (1, 0),
    "Reciprocal": (1, 0),
    "Erf": (1, 0),
    "Abs": (1, 0),
}

# PROJECT: nodes that only move, select or reshape data (or compute shapes): free, not listed.
FREE = {
    "Reshape", "Flatten", "Concat", "Transpose", "Identity", "Dropout", "Shape", "Size",
    "Gather", "Unsqueeze", "Squeeze", "Constant", "ConstantOfShape", "Cast", "Slice",
    "Split", "Pad", "Expand", "Tile", "Range", "SpaceToDepth", "DepthToSpace",
}

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger"}

FLOAT_BITS = {onnx.TensorProto.FLOAT: 32, onnx.TensorProto.FLOAT16: 16,
              onnx.TensorProto.BFLOAT16: 16, onnx.TensorProto.DOUBLE: 64}


# --------------------------------------------------------------------------------------------
# Graph helpers
# --------------------------------------------------------------------------------------------

def node_names(nodes) -> list[str]:
    """A unique name per node: its own name if non-empty and unique, else <op_type>_<index>.

    (Same naming the CLI documents for its per-layer rows, so per-node results can be matched.)"""
    count: dict[str, int] = {}
    for n in nodes:
        count[n.name] = count.get(n.name, 0) + 1
    taken = {n.name for n in nodes if n.name and count[n.name] == 1}
    out = []
    for i, n in enumerate(nodes):
        if n.name and count[n.name] == 1:
            out.append(n.name)
            continue
        base = name = f"{n.op_type}_{i}"
        k = 1
        while name in taken:
            name = f"{base}_{k}"
            k += 1
        taken.add(name)
        out.append(name)
    return out


def constant_tensors(graph) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node tensors, by value name."""
    out = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type != "Constant":
            continue
        for a in n.attribute:
            if a.name == "value":
                t = onnx.TensorProto()
                t.CopyFrom(a.t)
                out[n.output[0]] = t
            elif a.name in ("value_float", "value_floats", "value_int", "value_ints"):
                v = onnx.helper.get_attribute_value(a)
                arr = np.array(v, dtype=np.float32 if "float" in a.name else np.int64)
                out[n.output[0]] = numpy_helper.from_array(arr, n.output[0])
    return out


def fix_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of the model with every symbolic / zero leading dim of the real inputs and the
    outputs set to 1, and stale value_info dropped, ready for shape inference."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if d.HasField("dim_param") or (d.HasField("dim_value") and d.dim_value <= 0):
                if i != 0:
                    raise SystemExit(f"input/output '{vi.name}' has a symbolic non-batch dim {i}")
                d.Clear()
                d.dim_value = 1
    del m.graph.value_info[:]
    return m


def inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    m = shape_inference.infer_shapes(fix_batch(model), strict_mode=True, data_prop=True)
    shapes = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        if all(d >= 0 for d in dims):
            shapes[vi.name] = dims
    return shapes


def ort_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of `names` as onnxruntime computes them on a zero input of batch 1."""
    import onnxruntime as ort

    m = fix_batch(model)
    have = {o.name for o in m.graph.output}
    for nm in names:
        if nm not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=nm))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inits = {t.name for t in m.graph.initializer}
    feeds = {}
    for i in sess.get_inputs():
        if i.name in inits:
            continue
        vi = next(v for v in m.graph.input if v.name == i.name)
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        dt = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[i.name] = np.zeros(shape, dtype=dt)
    outs = sess.run([o.name for o in sess.get_outputs()], feeds)
    return {o.name: tuple(np.asarray(v).shape) for o, v in zip(sess.get_outputs(), outs)}


def numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------

def count(model: onnx.ModelProto, freebie: bool, ort_check: bool) -> dict:
    g = model.graph
    consts = constant_tensors(g)
    names = node_names(g.node)

    for n in g.node:
        if n.op_type in QUANTIZED_OPS:
            raise SystemExit(f"ref_count.py counts float models only; found {n.op_type}")

    # Freebie (RULES): an unquantized model may count params and multiplies at 16 bits;
    # "all addition operations are still considered to be calculated in full 32-bit precision".
    # NB: print_summary(0, PARAMETER_BITS=16, ACCUMULATOR_BITS=32, INPUT_BITS=16).
    param_bits = 16 if freebie else 32
    mul_w = (16 if freebie else 32) / 32.0  # REF process_counts: mults * mul_bits / 32
    add_w = 32 / 32.0  # REF process_counts: adds * add_bits / 32, add_bits = 32

    shapes = inferred_shapes(model)
    if ort_check:
        wanted = [o for n in g.node for o in n.output if o and o not in consts]
        real = ort_shapes(model, wanted)
        for k, s in real.items():
            if k in shapes and shapes[k] != s:
                raise SystemExit(f"shape of '{k}': onnx shape inference {shapes[k]}, onnxruntime {s}")
            shapes.setdefault(k, s)

    producer = {}
    consumers: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            if o:
                producer[o] = i
        for v in n.input:
            if v:
                consumers[v] = consumers.get(v, 0) + 1
    graph_outputs = [o.name for o in g.output]

    def uses(v: str) -> int:
        return consumers.get(v, 0) + graph_outputs.count(v)

    def const_array(v: str):
        """Value of a constant input (following Identity), else None."""
        while v not in consts and v in producer and g.node[producer[v]].op_type == "Identity":
            v = g.node[producer[v]].input[0]
        if v in consts:
            return consts[v]
        return None

    def weight_bits(t: onnx.TensorProto) -> int:
        if t.data_type not in FLOAT_BITS:
            raise SystemExit(f"weight '{t.name}' has non-float type {t.data_type}: quantized, out of scope")
        # Freebie: stored float values count 16 bits ("quantized to 16-bits at no accuracy penalty").
        return min(FLOAT_BITS[t.data_type], param_bits)

    def shape(v: str):
        if v not in shapes:
            raise SystemExit(f"no shape for '{v}'")
        return shapes[v]

    # Values computed only from constants (and shapes): their nodes are free (PROJECT).
    static = set(consts)
    for n in g.node:
        ins = [v for v in n.input if v]
        if n.op_type in ("Shape", "Constant") or all(v in static for v in ins):
            static.update(o for o in n.output if o)

    weighted = {}  # node index -> weight TensorProto
    for i, n in enumerate(g.node):
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) >= 2:
            t = const_array(n.input[1])
            if t is not None:
                weighted[i] = t

    per_node: dict[str, dict] = {}
    uncounted = []

    def row(i, **kw):
        n = g.node[i]
        r = {"op_type": n.op_type, "params": 0.0, "mults": 0.0, "adds": 0.0,
             "raw_mults": 0.0, "raw_adds": 0.0}
        r.update(kw)
        per_node[names[i]] = r
        return r

    for i, n in enumerate(g.node):
        op = n.op_type
        outs = [o for o in n.output if o]
        if op in FREE or all(o in static for o in outs):
            continue
        y = shape(n.output[0])
        e = numel(y)  # output elements (batch 1)

        # ---------------- weighted layers ----------------
        if i in weighted:
            t = weighted[i]
            w = numpy_helper.to_array(t).astype(np.float64)
            wb = weight_bits(t)
            if op == "Conv":
                # ONNX weight [C_out, C_in/group, kh, kw]; REF's [k, k, c_in, c_out] transposed.
                c_out = w.shape[0]
                # REF: n_output_elements = out_size**2 * c_out   (here: from the graph's shape)
                # so positions per output channel = out_size**2 = e / c_out.
                positions = e // c_out
                assert positions * c_out == e
                # REF: vector_length = (k_size * k_size * c_in) * (1 - sparsity)
                #      (depthwise: (k_size * k_size) * (1 - sparsity); ONNX's [C,1,k,k] slice per
                #       channel has exactly k*k entries, grouped: k*k*c_in/group.)
                # Per output channel c, vector_length_c = nonzeros of w[c] (exact zeros skipped).
                nnz_c = np.count_nonzero(w.reshape(c_out, -1), axis=1)
            elif op == "Gemm":
                # REF FullyConnected: n_elements = c_in * (1 - sparsity), per output unit.
                trans_b = any(a.name == "transB" and a.i == 1 for a in n.attribute)
                wm = w if trans_b else w.T  # [N, K]
                c_out = wm.shape[0]
                positions = e // c_out
                nnz_c = np.count_nonzero(wm, axis=1)
            elif op == "MatMul" and w.ndim == 2:
                wm = w.T  # [N, K]
                c_out = wm.shape[0]
                positions = e // c_out
                nnz_c = np.count_nonzero(wm, axis=1)
            else:
                raise SystemExit(f"node '{names[i]}' ({op}, weight rank {w.ndim}) is out of scope here")

            # REF: flop_mults += vector_length * n_output_elements
            raw_mults = float(nnz_c.sum()) * positions
            # REF: flop_adds += (vector_length - 1) * n_output_elements
            # (an all-zero channel computes nothing: 0 adds, not -1; PROJECT convention)
            raw_adds = float(np.maximum(nnz_c - 1, 0).sum()) * positions
            dead = int((nnz_c == 0).sum())

            # Storage. REF get_sparse_size:
            #   c_size = n_elements * param_bits * (1 - sparsity)
            #   if sparsity > 0: c_size += n_elements  # 1 bit binary mask.
            n_el = w.size
            nnz = int(np.count_nonzero(w))
            bits = n_el * wb if nnz == n_el else nnz * wb + n_el
            params = bits / 32.0  # RULES: a 32-bit parameter counts as one

            # REF: mults weighted by mul_bits / 32, adds by add_bits / 32.
            mults = raw_mults * max(wb, 16 if freebie else 32) / 32.0
            adds = raw_adds * add_w

            # REF: if op.use_bias: param_count += c_out * param_bits; flop_adds += n_output_elements
            if len(n.input) >= 3 and n.input[2] and op in ("Conv", "Gemm"):
                bt = const_array(n.input[2])
                if bt is None:
                    raise SystemExit(f"bias of '{names[i]}' is not constant")
                params += numel(bt.dims) * weight_bits(bt) / 32.0
                raw_adds += e
                adds += e * add_w
            row(i, params=params, mults=mults, adds=adds, raw_mults=raw_mults, raw_adds=raw_adds,
                weight_shape=list(w.shape), nnz=nnz, numel=n_el, dead_channels=dead)
            continue

        # ---------------- BatchNormalization ----------------
        if op == "BatchNormalization":
            c = numel(shape(n.input[1])) if n.input[1] in shapes else numel(consts[n.input[1]].dims)
            p = producer.get(n.input[0])
            if p is not None and p in weighted and uses(n.input[0]) == 1:
                pn = g.node[p]
                has_bias = pn.op_type in ("Conv", "Gemm") and len(pn.input) >= 3 and bool(pn.input[2])
                if has_bias:
                    # PROJECT / §8: "conv bias and BN together count once" -> nothing more here.
                    row(i, note=f"folded into {names[p]} (has bias)")
                else:
                    # NB: "batchnorm scales are not counted since they can be merged. Bias added for
                    # each batch norm applied on a layer's output." -> REF use_bias=True:
                    # param_count += c_out * param_bits; flop_adds += n_output_elements
                    row(i, params=c * param_bits / 32.0, adds=e * add_w, raw_adds=float(e),
                        note=f"folded into {names[p]} as a bias")
            else:
                # PROJECT: a BN that cannot fold costs its scale and shift.
                row(i, params=2 * c * param_bits / 32.0, mults=e * mul_w, adds=e * add_w,
                    raw_mults=float(e), raw_adds=float(e), note="standalone: scale + shift")
            continue

        # ---------------- activations ----------------
        if op in ACTIVATIONS:
            m_, a_ = ACTIVATIONS[op]
            # REF: flop_mults += n_muls * n_output_elements; flop_adds += n_adds * n_output_elements
            params = 0.0
            if op == "PRelu":
                slope = const_array(n.input[1])
                if slope is not None:
                    params = numel(slope.dims) * weight_bits(slope) / 32.0
            row(i, params=params, mults=m_ * e * mul_w, adds=a_ * e * add_w,
                raw_mults=float(m_ * e), raw_adds=float(a_ * e))
            continue

        def const_params():
            tot = 0.0
            for v in n.input[1:]:
                t = const_array(v) if v else None
                if t is not None:
                    tot += numel(t.dims) * weight_bits(t) / 32.0
            return tot

        operands = max(2, len([v for v in n.input if v]))
        if op in ("Add", "Sub", "Sum"):
            # REF Add(input_size, n_channels): flop_adds += input_size**2 * n_channels
            ra = float(e * (operands - 1))
            row(i, params=const_params(), adds=ra * add_w, raw_adds=ra)
        elif op in ("Mul", "Div", "Max", "Min"):
            # REF Scale(input_size, n_channels): flop_mults += input_size**2 * n_channels
            rm = float(e * (operands - 1))
            row(i, params=const_params(), mults=rm * mul_w, raw_mults=rm)
        elif op in ("GlobalAveragePool", "GlobalMaxPool"):
            x = shape(n.input[0])
            hw = numel(x[2:])
            c = e  # output [1, C, 1, 1]
            if op == "GlobalAveragePool":
                # REF GlobalAvg:
                #   flop_mults += op.n_channels
                #   flop_adds += (op.input_size * op.input_size - 1) * op.n_channels
                row(i, mults=c * mul_w, adds=(hw - 1) * c * add_w,
                    raw_mults=float(c), raw_adds=float((hw - 1) * c))
            else:
                row(i, mults=(hw - 1) * c * mul_w, raw_mults=float((hw - 1) * c))
        elif op in ("ReduceMean", "ReduceSum"):
            x = shape(n.input[0])
            r = numel(x) // e
            rm = float(e) if op == "ReduceMean" else 0.0
            row(i, mults=rm * mul_w, adds=(r - 1) * e * add_w, raw_mults=rm, raw_adds=float((r - 1) * e))
        elif op in ("MaxPool", "AveragePool"):
            ks = next((list(a.ints) for a in n.attribute if a.name == "kernel_shape"), [1])
            k = max(1, numel(ks))
            if op == "MaxPool":
                # PROJECT: k*k - 1 comparisons per output, counted as multiplies (like REF relu)
                row(i, mults=(k - 1) * e * mul_w, raw_mults=float((k - 1) * e))
            else:
                row(i, mults=e * mul_w, adds=(k - 1) * e * add_w, raw_mults=float(e),
                    raw_adds=float((k - 1) * e))
        elif op == "Neg":
            row(i, note="sign flip: free")
        else:
            uncounted.append({"name": names[i], "op_type": op, "output_elements": e})

    tot = {k: sum(r[k] for r in per_node.values()) for k in ("params", "mults", "adds", "raw_mults", "raw_adds")}
    tot["ops"] = tot["mults"] + tot["adds"]
    real_inputs = [v for v in g.input if v.name not in {t.name for t in g.initializer}]
    return {
        **tot,
        "freebie": freebie,
        "input_shapes": {v.name: list(shape(v.name)) for v in real_inputs},
        "per_node": per_node,
        "uncounted": uncounted,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--no-freebie", action="store_true", help="count float32 at 32 bits")
    ap.add_argument("--no-ort-check", action="store_true", help="skip the onnxruntime shape cross-check")
    a = ap.parse_args()
    model = onnx.load(a.model)  # external data is loaded from beside the file
    onnx.checker.check_model(model)
    out = count(model, freebie=not a.no_freebie, ort_check=not a.no_ort_check)
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
