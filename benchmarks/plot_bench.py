#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Turns linen_bench's JSON output into a chart and a markdown table.

    ./linen_bench --benchmark_repetitions=5 --benchmark_format=json > bench.json
    python3 benchmarks/plot_bench.py bench.json -o chart.svg --table table.md

The chart plots GFLOP/s against the sequence length L for the attention core at B=1,
H=8, D=64 (BM_fused_attention, BM_reference_attention), the whole layer
(BM_self_attention at E=512, H=8, when present) and the same run's Eigen sgemm (n=1024)
as a horizontal line. It is a PNG through matplotlib when matplotlib is installed and the
output name ends in .png, else an SVG written here (no dependencies). The table lists every
row (the median of repetitions when the run has them) and the ratios the issue's targets
are stated in, each taken within this one run.
"""
import argparse
import json
import math
import re
import statistics
import sys
from collections import OrderedDict


def load_rows(path):
    """{name: {"time_ms", "counters"}}: the median aggregate of each benchmark when the run
    has repetitions, else the median of its iteration rows. Names lose the /real_time suffix."""
    with open(path) as f:
        data = json.load(f)
    runs = OrderedDict()
    medians = {}
    for b in data.get("benchmarks", []):
        name = b.get("run_name", b["name"])
        name = re.sub(r"/real_time$", "", name)
        name = re.sub(r"/iterations:\d+", "", name)
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[name] = b
            continue
        runs.setdefault(name, []).append(b)
    skip = {"name", "run_name", "run_type", "repetitions", "repetition_index", "threads", "iterations",
            "real_time", "cpu_time", "time_unit", "family_index", "per_family_instance_index",
            "aggregate_name", "aggregate_unit", "label", "error_occurred", "error_message"}
    unit_ms = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
    rows = OrderedDict()
    for name, items in runs.items():
        if name in medians:
            b = medians[name]
            time_ms = b["real_time"] * unit_ms[b.get("time_unit", "ns")]
            counters = {k: v for k, v in b.items() if k not in skip and isinstance(v, (int, float))}
        else:
            time_ms = statistics.median(b["real_time"] * unit_ms[b.get("time_unit", "ns")] for b in items)
            keys = {k for b in items for k, v in b.items() if k not in skip and isinstance(v, (int, float))}
            counters = {k: statistics.median(b[k] for b in items if k in b) for k in keys}
        rows[name] = {"time_ms": time_ms, "counters": counters, "repetitions": len(items)}
    return data.get("context", {}), rows


def args_of(name):
    """'BM_x/B:1/L:512/H:8' -> ('BM_x', {'B': 1, 'L': 512, 'H': 8})."""
    parts = name.split("/")
    out = {}
    for p in parts[1:]:
        if ":" in p:
            k, v = p.split(":", 1)
            try:
                out[k] = int(v)
            except ValueError:
                out[k] = v
    return parts[0], out


def series(rows, family, fixed, counter="GFLOP/s"):
    pts = []
    for name, r in rows.items():
        fam, a = args_of(name)
        if fam != family or any(a.get(k) != v for k, v in fixed.items()) or counter not in r["counters"]:
            continue
        pts.append((a["L"], r["counters"][counter]))
    return sorted(pts)


def find(rows, family, **fixed):
    for name, r in rows.items():
        fam, a = args_of(name)
        if fam == family and all(a.get(k) == v for k, v in fixed.items()):
            return r
    return None


def gflops(r):
    return None if r is None else r["counters"].get("GFLOP/s")


# ---- chart --------------------------------------------------------------------------------

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def svg_chart(lines, hline, title, subtitle):
    """lines: [(label, [(L, y)])]; hline: (label, y) or None. Log2 x axis, linear y."""
    W, H = 760, 440
    left, right, top, bottom = 70, 200, 50, 60
    pw, ph = W - left - right, H - top - bottom
    xs = sorted({x for _, pts in lines for x, _ in pts}) or [1, 2]
    ys = [y for _, pts in lines for _, y in pts] + ([hline[1]] if hline else [])
    x0, x1 = math.log2(min(xs)), math.log2(max(xs))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    ymax = max(ys) * 1.12 if ys else 1.0
    step = 10 ** math.floor(math.log10(ymax / 5)) if ymax > 0 else 1
    for m in (1, 2, 5, 10):
        if ymax / (step * m) <= 8:
            step *= m
            break
    ymax = math.ceil(ymax / step) * step

    def px(x):
        return left + (math.log2(x) - x0) / (x1 - x0) * pw

    def py(y):
        return top + ph - y / ymax * ph

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{left}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>',
         f'<text x="{left}" y="40" fill="#555">{escape(subtitle)}</text>']
    y = 0.0
    while y <= ymax + 1e-9:
        o.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{left + pw}" y2="{py(y):.1f}" stroke="#e5e5e5"/>')
        o.append(f'<text x="{left - 8}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
        y += step
    for x in xs:
        o.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{top + ph}" stroke="#f0f0f0"/>')
        o.append(f'<text x="{px(x):.1f}" y="{top + ph + 18}" text-anchor="middle">{x}</text>')
    o.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    o.append(f'<text x="{left + pw / 2}" y="{H - 15}" text-anchor="middle">sequence length L</text>')
    o.append(f'<text x="18" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 18 {top + ph / 2})">GFLOP/s</text>')
    legend_y = top + 10
    if hline:
        o.append(f'<line x1="{left}" y1="{py(hline[1]):.1f}" x2="{left + pw}" y2="{py(hline[1]):.1f}" '
                 f'stroke="#555" stroke-dasharray="6 4"/>')
        o.append(f'<line x1="{left + pw + 15}" y1="{legend_y}" x2="{left + pw + 40}" y2="{legend_y}" stroke="#555" '
                 f'stroke-dasharray="6 4"/><text x="{left + pw + 46}" y="{legend_y + 4}">{escape(hline[0])}</text>')
        legend_y += 20
    for i, (label, pts) in enumerate(lines):
        c = COLORS[i % len(COLORS)]
        if pts:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            o.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
            for x, y in pts:
                o.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{c}"/>')
        o.append(f'<line x1="{left + pw + 15}" y1="{legend_y}" x2="{left + pw + 40}" y2="{legend_y}" stroke="{c}" '
                 f'stroke-width="2"/><text x="{left + pw + 46}" y="{legend_y + 4}">{escape(label)}</text>')
        legend_y += 20
    o.append("</svg>")
    return "\n".join(o) + "\n"


def escape(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def png_chart(path, lines, hline, title, subtitle):
    import matplotlib  # noqa: F401  (only when installed)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for label, pts in lines:
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    if hline:
        ax.axhline(hline[1], linestyle="--", color="#555", label=hline[0])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("GFLOP/s")
    ax.set_ylim(bottom=0)
    ax.set_title(title + "\n" + subtitle, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- table --------------------------------------------------------------------------------

def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fmt(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


FAMILY_ORDER = ["BM_eigen_sgemm", "BM_eigen_sgemm_qkT", "BM_memory_read_bandwidth", "BM_dot_product_attention",
                "BM_dot_product_attention_causal", "BM_fused_attention", "BM_reference_attention",
                "BM_fused_attention_causal", "BM_fused_attention_threads", "BM_fused_decode_step",
                "BM_fused_attention_peak_memory", "BM_self_attention", "BM_self_attention_reference",
                "BM_self_attention_causal", "BM_self_attention_threads", "BM_self_attention_decode_step", "BM_self_attention_forward",
                "BM_self_attention_vjp_forward", "BM_self_attention_backward", "BM_self_attention_backward_reference",
                "BM_self_attention_backward_threads2"]


def sort_key(name):
    fam, a = args_of(name)
    rank = FAMILY_ORDER.index(fam) if fam in FAMILY_ORDER else len(FAMILY_ORDER)
    return (rank, fam, [(k, v if isinstance(v, int) else 0) for k, v in a.items()])


def table(context, rows):
    out = []
    host = context.get("host_name", "?")
    cpus = context.get("num_cpus", "?")
    mhz = context.get("mhz_per_cpu", "?")
    caches = ", ".join(f"L{c['level']} {c['type'][0]} {c['size'] // 1024} KiB" + (f" x{c['num_sharing']}" if c.get('num_sharing', 1) > 1 else "")
                       for c in context.get("caches", []))
    out.append(f"Machine: {host}, {cpus} CPUs at {mhz} MHz (as reported), caches: {caches}; "
               f"load average {context.get('load_avg', '?')}; run {context.get('date', '?')}.")
    out.append("")
    out.append("| Benchmark | Time (ms) | GFLOP/s | Other counters |")
    out.append("|---|---:|---:|---|")
    for name in sorted(rows, key=sort_key):
        r = rows[name]
        c = dict(r["counters"])
        g = c.pop("GFLOP/s", None)
        c.pop("bytes_per_second", None)
        other = ", ".join(f"{k} {v:.3g}" for k, v in sorted(c.items()))
        out.append(f"| `{name}` | {r['time_ms']:.3f} | {fmt(g, 1)} | {other} |")
    out.append("")
    # The ratios, within this run.
    sgemm = gflops(find(rows, "BM_eigen_sgemm", n=1024))
    bw = find(rows, "BM_memory_read_bandwidth")
    bw = bw["counters"].get("GB/s") if bw else None
    lines = []

    def add(label, value, target=None):
        if value is not None:
            lines.append(f"| {label} | {fmt(value)} | {target or ''} |")

    for (b, l, e, h) in [(1, 512, 512, 8), (1, 2048, 512, 8), (8, 128, 512, 8), (1, 4096, 256, 4)]:
        add(f"SelfAttention ({b},{l},{e},{h}) / sgemm n=1024", ratio(gflops(find(rows, "BM_self_attention", B=b, L=l, E=e, H=h)), sgemm), ">= 1.0")
    for (b, l) in [(1, 512), (1, 2048), (8, 128)]:
        add(f"core fused ({b},{l},8,64) / sgemm n=1024", ratio(gflops(find(rows, "BM_fused_attention", B=b, L=l, H=8, D=64)), sgemm))
        add(f"core fused / reference ({b},{l},8,64)", ratio(gflops(find(rows, "BM_fused_attention", B=b, L=l, H=8, D=64)),
                                                           gflops(find(rows, "BM_reference_attention", B=b, L=l, H=8, D=64))))
    dense = find(rows, "BM_self_attention", B=1, L=2048, E=512, H=8)
    for flag, what in [(0, "mask"), (1, "flag")]:
        c = find(rows, "BM_self_attention_causal", B=1, L=2048, E=512, H=8, flag=flag)
        add(f"SelfAttention causal ({what}) speedup over dense, (1,2048,512,8)", ratio(dense and dense["time_ms"], c and c["time_ms"]), ">= 1.8")
    core = find(rows, "BM_fused_attention", B=1, L=2048, H=8, D=64)
    for mask, what in [(0, "flag"), (1, "mask")]:
        c = find(rows, "BM_fused_attention_causal", B=1, L=2048, H=8, D=64, mask=mask)
        add(f"core causal ({what}) speedup over dense, (1,2048,8,64)", ratio(core and core["time_ms"], c and c["time_ms"]), ">= 1.8")
    t1 = find(rows, "BM_fused_attention_threads", B=1, L=2048, H=8, D=64, threads=1)
    t2 = find(rows, "BM_fused_attention_threads", B=1, L=2048, H=8, D=64, threads=2)
    add("core 2 threads / 1 thread, (1,2048,8,64)", ratio(t1 and t1["time_ms"], t2 and t2["time_ms"]), ">= 1.8")
    t1 = find(rows, "BM_self_attention_threads", B=1, L=2048, E=512, H=8, threads=1)
    t2 = find(rows, "BM_self_attention_threads", B=1, L=2048, E=512, H=8, threads=2)
    add("SelfAttention 2 threads / 1 (config.thread_pool), (1,2048,512,8)", ratio(t1 and t1["time_ms"], t2 and t2["time_ms"]), ">= 1.8")
    bwd = find(rows, "BM_self_attention_backward", B=1, L=2048, E=512, H=8)
    add("SelfAttention backward / forward (best of, same benchmark), (1,2048,512,8)", bwd and bwd["counters"].get("x_forward"), "<= 2.5")
    f32 = find(rows, "BM_fused_decode_step", L=4096, H=8, D=64, dtype=32)
    b16 = find(rows, "BM_fused_decode_step", L=4096, H=8, D=64, dtype=16)
    add("decode step f32 GB/s / read bandwidth", ratio(f32 and f32["counters"].get("GB/s"), bw), ">= 0.8")
    add("decode step bf16 speedup over f32", ratio(f32 and f32["time_ms"], b16 and b16["time_ms"]), ">= 1.7")
    f32 = find(rows, "BM_self_attention_decode_step", L=4096, E=512, H=8, dtype=32)
    b16 = find(rows, "BM_self_attention_decode_step", L=4096, E=512, H=8, dtype=16)
    add("SelfAttention decode_step f32 (L=4096, E=512) cache GB/s / read bandwidth", ratio(f32 and f32["counters"].get("GB/s"), bw))
    add("SelfAttention decode_step bf16 speedup over f32", ratio(f32 and f32["time_ms"], b16 and b16["time_ms"]))
    mem = find(rows, "BM_fused_attention_peak_memory", L=32768, H=8, D=64)
    if mem:
        add("peak memory beyond inputs/outputs, L=32768 H=8 D=64 (MiB)", mem["counters"].get("beyond_io_MiB"), "<= 64")
    if lines:
        out.append("| Ratio (same run) | Value | Target |")
        out.append("|---|---:|---|")
        out.extend(lines)
        out.append("")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", help="linen_bench --benchmark_format=json output (or --benchmark_out file)")
    p.add_argument("-o", "--output", default="bench_chart.svg", help="chart file, .svg or .png (default bench_chart.svg)")
    p.add_argument("--table", help="write the markdown table here (default: print it)")
    p.add_argument("--title", default="linen attention, float32, B=1, H=8, D=64")
    a = p.parse_args(argv)
    context, rows = load_rows(a.json)
    if not rows:
        sys.exit(f"{a.json}: no benchmark rows")
    lines = [("fused core (dot_product_attention)", series(rows, "BM_fused_attention", {"B": 1, "H": 8, "D": 64})),
             ("reference core", series(rows, "BM_reference_attention", {"B": 1, "H": 8, "D": 64})),
             ("SelfAttention layer (E=512, fused)", series(rows, "BM_self_attention", {"B": 1, "E": 512, "H": 8}))]
    lines = [(label, pts) for label, pts in lines if pts]
    sg = gflops(find(rows, "BM_eigen_sgemm", n=1024))
    hline = ("Eigen sgemm n=1024 (same run)", sg) if sg else None
    subtitle = (f"{context.get('num_cpus', '?')} CPUs, one thread per row; "
                f"medians of {max(r['repetitions'] for r in rows.values())} repetitions; dense flop counts")
    if a.output.endswith(".png"):
        try:
            png_chart(a.output, lines, hline, a.title, subtitle)
        except ImportError:
            svg = a.output[:-4] + ".svg"
            print(f"matplotlib is not installed: writing {svg} instead of {a.output}", file=sys.stderr)
            a.output = svg
    if a.output.endswith(".svg"):
        with open(a.output, "w") as f:
            f.write(svg_chart(lines, hline, a.title, subtitle))
    md = table(context, rows)
    if a.table:
        with open(a.table, "w") as f:
            f.write(md + "\n")
    else:
        print(md)
    print(f"chart: {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
