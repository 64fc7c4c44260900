#!/usr/bin/env python3
"""The `make bench` driver (stdlib only; tests/bench/run.sh prepares everything and calls it).

For every model it times, in the same run and round-robin (so drift hits every
tool alike):

  ours     onnx-micronet convert IN -o OUT [--external-data]
  plain    tests/bench/plain_roundtrip.rs: fs::read + prost decode + encode + fs::write
  python   onnx.load + onnx.save in the venv (tests/bench/py_roundtrip.py)

Each command runs once to warm the page cache (not counted), then REPEAT times;
the table gives the median wall time (with min-max) and the max peak RSS. Every run
is measured by tests/bench/measure.py in a fresh small interpreter so the peak RSS is the
command's own. Outputs are deleted and `sync` is called before every run, so no run
pays for another's writeback. Our output is compared with the input after every run
(byte for byte); a mismatch fails the bench.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys

MIB = 1024 * 1024


def die(msg):
    print(f"bench: {msg}", file=sys.stderr)
    sys.exit(1)


def first_difference(a, b):
    """None when the files are byte-identical, else a description of the first difference."""
    sa, sb = os.path.getsize(a), os.path.getsize(b)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                n = min(len(ca), len(cb))
                i = next((k for k in range(n) if ca[k] != cb[k]), n)
                return f"differ at byte {offset + i} (sizes {sa} and {sb})"
            if not ca:
                return None
            offset += len(ca)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Case:
    """One tool on one model."""

    def __init__(self, tool, label, argv, outputs, check=None, note="", comparable=True):
        self.tool = tool  # "ours", "plain", "python"
        self.label = label  # what the table shows
        self.argv = argv
        self.outputs = outputs  # files to delete before each run
        self.check = check  # (expected_file, produced_file, loud) compared after each run
        self.note = note
        self.comparable = comparable  # False: reads only part of the input (RSS / size means nothing)
        self.runs = []
        self.failed = None
        self.check_results = []
        self.report = None  # optimize's --report JSON, read after each run
        self.pass_seconds = []  # per run: {pass: seconds}


class Model:
    def __init__(self, key, title, path, side_files=(), reference=None):
        self.key = key
        self.title = title
        self.path = path
        self.side_files = list(side_files)
        self.reference = reference  # single-file twin of an external-data model
        self.cases = []
        self.post_checks = []  # (description, ok, detail)
        self.repeat = None  # None: --repeat

    @property
    def size(self):
        return os.path.getsize(self.path) + sum(os.path.getsize(p) for p in self.side_files)

    @property
    def external(self):
        return bool(self.side_files)


def build_models(args):
    root = args.root
    out = os.path.join(args.out_dir, "run")
    models, skipped = [], []

    def single(key, title, path, extended=False, track="cifar100"):
        if not os.path.exists(path):
            skipped.append(f"{title}: {os.path.relpath(path, root)} is missing")
            return
        m = Model(key, title, path)
        d = os.path.join(out, key)
        os.makedirs(d, exist_ok=True)
        o, p, y = (os.path.join(d, f"{t}.onnx") for t in ("ours", "plain", "python"))
        m.cases = [
            Case("ours", "ours: convert", [args.bin, "convert", path, "-o", o], [o], (path, o, True)),
            Case("plain", "plain: prost round trip", [args.plain, path, p], [p], (path, p, False)),
            Case("python", "python: onnx.load+save", [args.python, args.py_roundtrip, path, y], [y], (path, y, False)),
        ]
        if extended:
            m.cases += optimize_cases(args, path, d, track)
        models.append(m)

    single("mobilenetv2_cifar", "MobileNetV2 CIFAR (fixture)", os.path.join(root, "fixtures", "mobilenetv2_cifar_bn.onnx"))
    single("mobilenetv2_imagenet", "MobileNetV2 ImageNet (fixtures/extra)", os.path.join(root, "fixtures", "extra", "mobilenet_v2_bn.onnx"),
           extended=True, track="imagenet")
    resnet = os.path.join(args.out_dir, "resnet50_bn.onnx")
    single("resnet50", "ResNet-50, unfused BN (generated)", resnet, extended=True, track="imagenet")

    ext = os.path.join(args.out_dir, "ext", "resnet50_bn.onnx")
    if os.path.exists(ext) and os.path.exists(ext + ".data"):
        m = Model("resnet50_ext", "ResNet-50, external data (generated)", ext, [ext + ".data"], reference=resnet)
        d = os.path.join(out, m.key)
        for sub in ("ours_inline", "ours_ext", "plain", "python"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        oi = os.path.join(d, "ours_inline", "resnet50_bn.onnx")
        oe = os.path.join(d, "ours_ext", "resnet50_bn.onnx")
        p = os.path.join(d, "plain", "resnet50_bn.onnx")
        y = os.path.join(d, "python", "resnet50_bn.onnx")
        m.cases = [
            Case("ours", "ours: convert (inline)", [args.bin, "convert", ext, "-o", oi], [oi],
                 (resnet, oi, True) if os.path.exists(resnet) else None,
                 "external data pulled into one file"),
            Case("ours_ext", "ours: convert --external-data", [args.bin, "convert", ext, "-o", oe, "--external-data"],
                 [oe, oe + ".data"], None, "model + one side file"),
            Case("plain", "plain: prost round trip (model file only)", [args.plain, ext, p], [p], (ext, p, False),
                 "reads and writes the model file only, not its data", comparable=False),
            Case("python", "python: onnx.load+save (external)", [args.python, args.py_roundtrip, ext, y, "--external"],
                 [y, y + ".data"], None, "loads external data, saves with save_as_external_data=True"),
        ]
        models.append(m)
    else:
        skipped.append(f"ResNet-50 external data: {os.path.relpath(ext, root)} (+ .data) is missing")

    big = os.path.join(args.out_dir, "big", "big.onnx")
    if os.path.exists(big) and os.path.exists(big + ".data"):
        m = Model("big", "Conv+BN x9, 2.25 GiB, external data (generated)", big, [big + ".data"])
        m.repeat = 1
        d = os.path.join(out, m.key)
        os.makedirs(d, exist_ok=True)
        oc = os.path.join(d, "convert.onnx")
        m.cases = [Case("ours", "ours: convert (external data: auto)", [args.bin, "convert", big, "-o", oc], [oc, oc + ".data"],
                        None, "model + side file (over 2 GiB)")]
        m.cases += optimize_cases(args, big, d, "imagenet", full=False, quantize_only=True)
        models.append(m)
    elif args.big:
        skipped.append("2 GiB model: tests/bench/out/big/big.onnx is missing")
    return models, skipped


def optimize_flags(args):
    """What `optimize` offers now (quantization and packing arrive in other issues)."""
    if not hasattr(args, "_help"):
        args._help = subprocess.run([args.bin, "optimize", "--help"], capture_output=True, text=True).stdout
    full = ["--prune", "magnitude:0.5"]
    if "--quantize" in args._help:
        full += ["--quantize", "linear:8"]
    if "packed" in args._help:
        full += ["--storage", "packed"]
    return full


def optimize_cases(args, path, d, track, full=True, quantize_only=False):
    """score, optimize (fold only; fold + prune + quantize + pack), and the Python tools."""
    o_fold, o_full, o_q = (os.path.join(d, f"opt_{t}.onnx") for t in ("fold", "full", "q"))
    r_fold, r_full, r_q = (os.path.join(d, f"opt_{t}.json") for t in ("fold", "full", "q"))
    cases = [
        Case("score", "ours: score", [args.bin, "score", path, "--track", track, "--json", os.path.join(d, "score.json")],
             [os.path.join(d, "score.json")], None, "MicroNet report (JSON)"),
        Case("opt_fold", "ours: optimize (fold BN)", [args.bin, "optimize", path, "-o", o_fold, "--track", track, "--report", r_fold],
             [o_fold, o_fold + ".data"], None, "BN folded; report has per-pass seconds"),
    ]
    cases[-1].report = r_fold
    if full:
        flags = optimize_flags(args)
        c = Case("opt_full", "ours: optimize (fold " + " ".join(flags) + ")",
                 [args.bin, "optimize", path, "-o", o_full, "--track", track, "--report", r_full, *flags],
                 [o_full, o_full + ".data"], None, "the full pipeline available")
        c.report = r_full
        cases.append(c)
        cases.append(Case("py_fuse", "python: onnxoptimizer fuse_bn_into_conv",
                          [args.python, os.path.join(args.here, "py_fuse_bn.py"), path, os.path.join(d, "py_fused.onnx")],
                          [os.path.join(d, "py_fused.onnx")], None, "onnx.load + fuse_bn_into_conv + onnx.save"))
        cases.append(Case("py_qdyn", "python: onnxruntime quantize_dynamic",
                          [args.python, os.path.join(args.here, "py_quantize_dynamic.py"), path, os.path.join(d, "py_qdyn.onnx")],
                          [os.path.join(d, "py_qdyn.onnx")], None, "int8 weights (QInt8), no calibration"))
    if quantize_only and "--quantize" in optimize_flags(args):
        c = Case("opt_q", "ours: optimize (fold --quantize linear:8)",
                 [args.bin, "optimize", path, "-o", o_q, "--track", track, "--report", r_q, "--quantize", "linear:8"],
                 [o_q, o_q + ".data"], None, "fold + int8 weights")
        c.report = r_q
        cases.append(c)
    return cases


def measure(args, argv, stderr_path):
    cmd = [args.python, "-I", "-S", args.measure, "--stderr", stderr_path, "--", *argv]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        die(f"measure.py failed on {' '.join(argv)}: {r.stderr.strip()}")
    return json.loads(r.stdout)


def clean(paths):
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def run_case(args, case, log_dir, counted):
    if case.failed:
        return
    clean(case.outputs)
    os.sync()
    err = os.path.join(log_dir, f"{case.tool}.stderr")
    r = measure(args, case.argv, err)
    if r["exit"] != 0:
        with open(err, errors="replace") as f:
            tail = f.read()[-2000:]
        case.failed = f"exit {r['exit']}: {' '.join(case.argv)}\n{tail}"
        return
    if case.check:
        expected, produced, _loud = case.check
        case.check_results.append(first_difference(expected, produced))
    if counted:
        case.runs.append(r)
        # Kept as they come: a later failure does not lose the measurements.
        with open(os.path.join(log_dir, "..", "measurements.jsonl"), "a") as f:
            f.write(json.dumps({"case": case.label, "argv": case.argv, **r}) + "\n")
        if case.report and os.path.exists(case.report):
            with open(case.report) as f:
                rep = json.load(f)
            case.pass_seconds.append({p["pass"]: p["seconds"] for p in rep.get("passes", [])})


def post_checks(args, m):
    """Untimed checks of the external-data model's outputs."""
    ext = [c for c in m.cases if c.tool == "ours_ext"]
    if not m.external or not ext:
        return
    oe = ext[0].outputs[0]
    if m.reference and os.path.exists(m.reference) and os.path.exists(oe):
        back = os.path.join(os.path.dirname(os.path.dirname(oe)), "ours_ext_back.onnx")
        clean([back])
        r = subprocess.run([args.bin, "convert", oe, "-o", back], capture_output=True, text=True)
        if r.returncode != 0:
            m.post_checks.append(("ours --external-data output converts back to one file", False, r.stderr.strip()))
        else:
            diff = first_difference(m.reference, back)
            m.post_checks.append(
                ("ours --external-data output, converted back to one file, equals the single-file model", diff is None, diff or "")
            )
        clean([back])


def fmt_mib(kib):
    return f"{kib / 1024:.1f}"


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "n/a"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--plain", required=True)
    ap.add_argument("--python", required=True, help="the venv's python (runs onnx, and measure.py)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--big", action="store_true", help="the 2 GiB model is expected (tests/bench/out/big/)")
    args = ap.parse_args()
    if args.repeat < 1:
        die("BENCH_REPEAT must be at least 1")
    here = os.path.dirname(os.path.abspath(__file__))
    args.here = here
    args.measure = os.path.join(here, "measure.py")
    args.py_roundtrip = os.path.join(here, "py_roundtrip.py")

    args.load_before = os.getloadavg()
    models, skipped = build_models(args)
    if not models:
        die("no model to measure: " + "; ".join(skipped))
    for s in skipped:
        print(f"bench: skipping {s}", file=sys.stderr)

    # Python's fixed cost, for reading the python column.
    baseline = Case("python", "python -c 'import onnx'", [args.python, "-c", "import onnx"], [])
    log_root = os.path.join(args.out_dir, "run", "logs")
    os.makedirs(log_root, exist_ok=True)

    for m in models:
        log_dir = os.path.join(log_root, m.key)
        os.makedirs(log_dir, exist_ok=True)
        print(f"bench: {m.title}: {os.path.relpath(m.path, args.root)} ({m.size / MIB:.1f} MiB), "
              f"1 warm-up + {m.repeat or args.repeat} runs of {len(m.cases)} commands", file=sys.stderr)
        if m.repeat is None:  # the 2 GiB model: no warm-up (its page cache is what it is)
            for c in m.cases:
                run_case(args, c, log_dir, counted=False)
        for _ in range(m.repeat or args.repeat):
            for c in m.cases:
                run_case(args, c, log_dir, counted=True)
        post_checks(args, m)
    run_case(args, baseline, log_root, counted=False)
    for _ in range(args.repeat):
        run_case(args, baseline, log_root, counted=True)

    # The outputs were checked after every run; do not leave ~0.5 GB of copies behind.
    for m in models:
        for c in m.cases:
            clean(c.outputs)
    args.load_after = os.getloadavg()
    report, bad = render(args, models, skipped, baseline)
    print(report)
    path = os.path.join(args.out_dir, "results.md")
    with open(path, "w") as f:
        f.write(report)
    print(f"bench: wrote {os.path.relpath(path, args.root)}", file=sys.stderr)
    if bad:
        print("\n" + "!" * 72 + "\n" + "\n".join(f"BENCH FAILURE: {b}" for b in bad) + "\n" + "!" * 72, file=sys.stderr)
        sys.exit(1)


def summary(case):
    if case.failed or not case.runs:
        return None
    times = [r["wall_s"] for r in case.runs]
    return {
        "t": statistics.median(times),
        "tmin": min(times),
        "tmax": max(times),
        "rss": max(r["maxrss_kib"] for r in case.runs),
        "floor": max(r["floor_kib"] or 0 for r in case.runs),
        "cpu": statistics.median(r["user_s"] + r["sys_s"] for r in case.runs),
    }


def render(args, models, skipped, baseline):
    bad = []
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    try:
        onnx_version = subprocess.run(
            [args.python, "-c", "import onnx, numpy; print(onnx.__version__, numpy.__version__)"],
            capture_output=True, text=True).stdout.split()
    except OSError:
        onnx_version = []
    L = []
    L.append("# onnx-micronet bench")
    L.append("")
    L.append(f"- date: {now}")
    L.append(f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}, "
             f"Linux {platform.release()}; load average {args.load_before[0]:.2f} before, "
             f"{args.load_after[0]:.2f} after (other work on the machine makes the times noisy)")
    L.append(f"- python {platform.python_version()}" + (f", onnx {onnx_version[0]}, numpy {onnx_version[1]}" if len(onnx_version) == 2 else ""))
    L.append(f"- each command: 1 warm-up run (not counted; warms the page cache), then {args.repeat} runs "
             f"interleaved round-robin; time = median wall [min-max], CPU = median user+sys, "
             f"peak RSS = max over the runs. "
             f"Outputs are deleted and `sync` is called before every run (no run pays for another's writeback; "
             f"`ours` fsyncs its own output, the others do not).")
    floor = max((s["floor"] for m in models for c in m.cases if (s := summary(c))), default=0)
    L.append(f"- peak RSS is the command's own (os.wait4 of one child of a fresh {fmt_mib(floor)} MiB interpreter; "
             f"values at that floor mean \"at most\"). MiB = 2^20 bytes; size = model file + side files.")
    b = summary(baseline)
    if b:
        L.append(f"- python's fixed cost (`python -c 'import onnx'`): {b['t']:.3f} s, {fmt_mib(b['rss'])} MiB; "
                 "it is included in the python rows.")
    L.append("")
    for s in skipped:
        L.append(f"- skipped: {s}")
    if skipped:
        L.append("")

    L.append("## Absolute")
    L.append("")
    L.append("| model | size MiB | command | time s (median [min-max]) | CPU s | peak RSS MiB | RSS / size | output |")
    L.append("|---|---:|---|---:|---:|---:|---:|---|")
    for m in models:
        for c in m.cases:
            s = summary(c)
            if c.check:
                diffs = [d for d in c.check_results if d is not None]
                loud = c.check[2]
                what = "= input" if c.check[0] == m.path else "= single-file model"
                if not c.check_results:
                    out = "not checked"
                elif diffs:
                    out = f"MISMATCH ({len(diffs)}/{len(c.check_results)} runs: {diffs[0]})"
                    if loud:
                        bad.append(f"{m.title}: {c.label}: output does not equal the input: {diffs[0]}")
                else:
                    out = f"{what} (cmp, {len(c.check_results)} runs)"
            else:
                out = c.note
            if c.failed:
                bad.append(f"{m.title}: {c.label} failed: {c.failed}")
                L.append(f"| {m.title} | {m.size / MIB:.1f} | {c.label} | FAILED | | | | {c.failed.splitlines()[0]} |")
                continue
            at_floor = "≤ " if s["rss"] <= s["floor"] * 1.02 else ""
            per_size = f"{s['rss'] * 1024 / m.size:.2f}" if c.comparable else "n/a"
            L.append(f"| {m.title} | {m.size / MIB:.1f} | {c.label} | {s['t']:.3f} [{s['tmin']:.3f}-{s['tmax']:.3f}] "
                     f"| {s['cpu']:.3f} | {at_floor}{fmt_mib(s['rss'])} | {per_size} | {out} |")
        for desc, ok, detail in m.post_checks:
            if not ok:
                bad.append(f"{m.title}: {desc}: {detail}")
    L.append("")

    L.append("## Ratios")
    L.append("")
    L.append("| model | ours / plain time | ours / plain RSS | python / ours time | python / ours RSS |")
    L.append("|---|---:|---:|---:|---:|")
    for m in models:
        by = {c.tool: summary(c) for c in m.cases}
        ours, plain, py = by.get("ours"), by.get("plain"), by.get("python")
        # For the external-data model, python writes external data: compare it with ours --external-data.
        ours_py = by.get("ours_ext") if m.external else ours
        def r(a, b, k):
            return ratio(a and a[k], b and b[k])

        op_t, op_rss = ("n/a †", "n/a †") if m.external else (r(ours, plain, "t"), r(ours, plain, "rss"))
        L.append(f"| {m.title} | {op_t} | {op_rss} "
                 f"| {r(py, ours_py, 't')} | {r(py, ours_py, 'rss')} |")
    if any(m.external for m in models):
        L.append("")
        L.append("† external data: `plain` reads and writes the model file only (not the side file), so there is "
                 "no like-for-like ours/plain ratio; see the absolute rows. python/ours compares python's "
                 "external-data save with `ours --external-data`.")
    L.append("")

    render_targets(L, models, bad)

    L.append("## Checks")
    L.append("")
    for m in models:
        for c in m.cases:
            if c.check and c.check_results:
                diffs = [d for d in c.check_results if d is not None]
                status = "ok" if not diffs else ("MISMATCH" if c.check[2] else "differs (informational)")
                L.append(f"- {m.title}: {c.label}: output vs {os.path.relpath(c.check[0], args.root)}: {status}"
                         + (f" ({diffs[0]})" if diffs else "") + f", {len(c.check_results)} runs")
        for desc, ok, detail in m.post_checks:
            L.append(f"- {m.title}: {desc}: {'ok' if ok else 'FAILED: ' + detail}")
    L.append("")
    return "\n".join(L), bad


def render_targets(L, models, bad):
    """optimize and score against plain prost and the Python tools; the issue's targets."""
    rows = []
    for m in models:
        by = {c.tool: summary(c) for c in m.cases}
        if not any(k in by for k in ("opt_fold", "opt_full", "opt_q")):
            continue
        rows.append((m, by))
    if not rows:
        return
    L.append("## optimize, score and the Python tools")
    L.append("")
    L.append("| model | size MiB | command | time s | peak RSS MiB | RSS / size | time / plain | onnxoptimizer BN fusion / this |")
    L.append("|---|---:|---|---:|---:|---:|---:|---:|")
    for m, by in rows:
        plain, fuse = by.get("plain"), by.get("py_fuse")
        for c in m.cases:
            if c.tool not in ("score", "opt_fold", "opt_full", "opt_q", "py_fuse", "py_qdyn", "ours"):
                continue
            s = by.get(c.tool)
            if not s:
                L.append(f"| {m.title} | | {c.label} | FAILED | | | | |")
                continue
            vs_plain = ratio(s["t"], plain["t"]) if plain and c.tool != "py_fuse" and not m.external else "n/a"
            vs_fuse = ratio(fuse["t"], s["t"]) if fuse and c.tool in ("opt_fold", "opt_full") else ""
            L.append(f"| {m.title} | {m.size / MIB:.1f} | {c.label} | {s['t']:.3f} | {fmt_mib(s['rss'])} "
                     f"| {s['rss'] * 1024 / m.size:.2f} | {vs_plain} | {vs_fuse} |")
    L.append("")
    L.append("Time per pass (median over the runs, from optimize's --report JSON; the rest of an optimize run "
             "is load, scoring before and after, save and the reload that scores the written file):")
    L.append("")
    for m, by in rows:
        for c in m.cases:
            if c.pass_seconds and by.get(c.tool):
                passes = {}
                for run in c.pass_seconds:
                    for k, v in run.items():
                        passes.setdefault(k, []).append(v)
                parts = ", ".join(f"{k} {statistics.median(v):.3f} s" for k, v in passes.items())
                total = by[c.tool]["t"]
                in_passes = sum(statistics.median(v) for v in passes.values())
                L.append(f"- {m.title}, {c.label}: {parts}; passes {in_passes:.3f} s of {total:.3f} s")
    L.append("")
    L.append("Targets (issues #8 and #17):")
    L.append("")
    for m, by in rows:
        full = by.get("opt_full")
        fold = by.get("opt_fold")
        plain = by.get("plain")
        fuse = by.get("py_fuse")
        checks = []
        if m.key == "resnet50" and full and plain:
            checks.append(("full optimize under 2x the plain decode+encode", full["t"] / plain["t"], 2.0, "<"))
            checks.append(("full optimize peak RSS under 2.5x the file size", full["rss"] * 1024 / m.size, 2.5, "<"))
        qdyn = by.get("py_qdyn")
        if m.key == "resnet50" and full and qdyn:
            checks.append(("full optimize at most 1.5x onnxruntime's quantize_dynamic", full["t"] / qdyn["t"], 1.5, "<="))
        if m.key == "resnet50" and fuse and fold:
            checks.append(("fold at least 5x faster than onnxoptimizer's fuse_bn_into_conv", fuse["t"] / fold["t"], 5.0, ">"))
        if m.key == "big":
            for c in m.cases:
                s = by.get(c.tool)
                if s:
                    checks.append((f"{c.label}: peak RSS under 2.5x the size", s["rss"] * 1024 / m.size, 2.5, "<"))
        for what, v, limit, op in checks:
            ok = v < limit if op == "<" else v <= limit if op == "<=" else v >= limit
            L.append(f"- {m.title}: {what}: {v:.2f}x -> {'met' if ok else 'MISSED'}")
    L.append("")


if __name__ == "__main__":
    main()
