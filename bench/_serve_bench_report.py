"""serve_bench's outputs: serve_bench.md (from serve_bench.json), the latency-throughput PNG and one CAP radar
PNG per configuration (matplotlib, Agg backend).

    result JSON --> markdown: setup, probe peaks, SLO, one table row per (config, load), the knee, CAP scores
                --> serve_bench_latency.png: TTFT and TPOT p50 / p99 vs output tok/s, a line per config over the
                    rate sweep (the closed loop as a star)
                --> serve_bench_cap_<config>.png: cost, accuracy, performance (each 0..1, 1 = best of the run)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
import numpy as np  # noqa: E402


def _f(x, fmt="{:.0f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def table(result: dict) -> list[str]:
    lines = ["| config | load | sent / failed | req/s | out tok/s | TTFT p50 / p90 / p99 ms | "
             "TPOT mean / p50 / p99 ms | ITL p50 / p99 ms | E2EL p50 / p99 ms | goodput req/s (SLO met) | "
             "S-MBU | S-MFU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["configs"]:
        for ph in c["phases"]:
            s, cap = ph["summary"], ph["cap"]
            t, p, i, e = s["ttft_ms"], s["tpot_ms"], s["itl_ms"], s["e2el_ms"]
            lines.append(
                f"| {c['config']} | {ph['load']} | {s['sent']} / {s['failed']} | {s['request_throughput']:.2f} | "
                f"{s['output_token_throughput']:.1f} | {_f(t['p50'])} / {_f(t['p90'])} / {_f(t['p99'])} | "
                f"{_f(p['mean'], '{:.1f}')} / {_f(p['p50'], '{:.1f}')} / {_f(p['p99'], '{:.1f}')} | "
                f"{_f(i['p50'], '{:.1f}')} / {_f(i['p99'], '{:.1f}')} | {_f(e['p50'])} / {_f(e['p99'])} | "
                f"{s['goodput']:.2f} ({s['slo_attainment']:.0%}) | {_f(cap.get('s_mbu'), '{:.2%}')} | "
                f"{_f(cap.get('s_mfu'), '{:.2%}')} |")
    return lines


def write_markdown(out: Path, result: dict) -> None:
    s, pk = result["setup"], result["peaks"]
    lines = [f"# Serving benchmark in the field's terms: epserve serve, {s['ranks']} gloo ranks, default model", "",
             s["summary"], "",
             f"**SLO** (goodput counts requests meeting both): TTFT <= {s['slo_ttft_ms']:g} ms and TPOT <= "
             f"{s['slo_tpot_ms']:g} ms. {s['slo_note']}", "",
             f"**Machine peaks** (probe: one thread per process, best of {pk['tries']} tries; peak = the better "
             f"of one process alone and the sum of {pk['processes']} at once): memory bandwidth "
             f"{pk['peak_bytes_per_s'] / 1e9:.1f} GB/s (float32 tensor copy of {pk['copy_mib']} MiB, read + write "
             f"counted; alone {pk['one_thread_bytes_per_s'] / 1e9:.1f}, {pk['processes']} at once "
             f"{pk['together_bytes_per_s'] / 1e9:.1f} GB/s), float32 {pk['peak_flops_per_s'] / 1e9:.1f} GFLOP/s "
             f"({pk['matmul_n']}^3 matmul; alone {pk['one_thread_flops_per_s'] / 1e9:.1f}, {pk['processes']} at "
             f"once {pk['together_flops_per_s'] / 1e9:.1f} GFLOP/s).", "", *table(result), "",
             "## Knee and CAP", "",
             "| config | knee (rule below) | best out tok/s | accuracy (greedy = reference) | "
             "CPU-s per 1k out tokens | cost / accuracy / performance scores |", "|---|---|---|---|---|---|"]
    for c in result["configs"]:
        a, cap = c["accuracy"], c["cap_scores"]
        lines.append(f"| {c['config']} | {c['knee']} | {c['best_output_tok_s']:.1f} | {a['equal']}/{a['requests']} | "
                     f"{c['cpu_s_per_1k_tokens']:.1f} | {cap['cost']:.2f} / {cap['accuracy']:.2f} / "
                     f"{cap['performance']:.2f} |")
    lines += ["", s["knee_rule"], "", s["cap_note"], "", s["reading"], ""]
    (out / "serve_bench.md").write_text("\n".join(lines) + "\n")


def plot_latency(out: Path, result: dict) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    panels = [("ttft_ms", "p50"), ("ttft_ms", "p99"), ("tpot_ms", "p50"), ("tpot_ms", "p99")]
    for ax, (metric, q) in zip(axes.flat, panels):
        for k, c in enumerate(result["configs"]):
            color = f"C{k}"
            sweep = [ph for ph in c["phases"] if ph["kind"] == "open"]
            x = [ph["summary"]["output_token_throughput"] for ph in sweep]
            y = [ph["summary"][metric][q] for ph in sweep]
            ax.plot(x, y, "o-", color=color, label=c["config"])
            for ph, xi, yi in zip(sweep, x, y):
                ax.annotate(f"{ph['rate']:g}", (xi, yi), fontsize=7, textcoords="offset points", xytext=(3, 3))
            closed = [ph for ph in c["phases"] if ph["kind"] == "closed"]
            for ph in closed:
                ax.plot(ph["summary"]["output_token_throughput"], ph["summary"][metric][q], "*", ms=12,
                        color=color)
        ax.set_title(f"{metric.split('_')[0].upper()} {q}")
        ax.set_ylabel("ms")
        if metric == "ttft_ms":   # TTFT spans orders of magnitude past the knee; TPOT stays within a few x
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
            ax.tick_params(axis="y", which="minor", labelsize=7)
        else:
            ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("output tokens/s")
    axes[0, 0].legend(fontsize=8, title="config (numbers: offered req/s; star: closed loop)", title_fontsize=7)
    s = result["setup"]
    fig.suptitle(f"epserve serve, {s['ranks']} gloo ranks on a shared {s['cpu_cores']}-core CPU, default model: "
                 f"latency vs throughput (Poisson rate sweep)", fontsize=10)
    fig.tight_layout()
    path = out / "serve_bench_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_radar(out: Path, result: dict, c: dict) -> Path:
    axes_names = ["cost\n(least CPU-s per 1k tokens = 1)", "accuracy\n(greedy text = reference)",
                  "performance\n(out tok/s / best config)"]
    vals = [c["cap_scores"][k] for k in ("cost", "accuracy", "performance")]
    ang = np.linspace(0, 2 * np.pi, len(vals), endpoint=False).tolist()
    fig = plt.figure(figsize=(5, 5))
    ax = fig.add_subplot(111, polar=True)
    ax.set_theta_offset(np.pi / 2)
    ax.set_rlabel_position(60)
    ax.plot(ang + ang[:1], vals + vals[:1], "o-", color="C0")
    ax.fill(ang + ang[:1], vals + vals[:1], alpha=0.25, color="C0")
    ax.set_xticks(ang)
    ax.set_xticklabels(axes_names, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_yticks([0.25, 0.5, 0.75, 1.0])
    ax.set_title(f"CAP: {c['config']}\n{c['cpu_s_per_1k_tokens']:.1f} CPU-s/1k tok, accuracy "
                 f"{c['accuracy']['accuracy']:.2f}, {c['best_output_tok_s']:.0f} tok/s", fontsize=9, pad=24)
    fig.tight_layout()
    path = out / f"serve_bench_cap_{slug(c['config'])}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(out: Path) -> list[Path]:
    result = json.loads((out / "serve_bench.json").read_text())
    write_markdown(out, result)
    return [out / "serve_bench.md", plot_latency(out, result), *(plot_radar(out, result, c) for c in result["configs"])]
