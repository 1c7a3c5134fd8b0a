"""Plots of lab/calibration_comparison.py's results: the Pareto comparison and the premise.

Run: ``python lab/calibration_plots.py --comparison DIR/comparison.json [DIR2/comparison.json ...] --premise DIR/premise.json --out IMAGES``.
Writes IMAGES/calibration-pareto-cpu.png (skipped tiles and skipped attention FLOPs against PSNR and the overall
score, one colour per method), or IMAGES/calibration-pareto-gpu.png for runs with ``--time`` (one generation's
attention time against PSNR and the overall score), and IMAGES/calibration-premise-cpu.png (per layer, the
fraction of tiles negligible at step t still negligible at t + d).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

COLORS = {"global": "tab:blue", "profile": "tab:green", "marginal": "tab:orange", "per_call": "tab:red",
          "dense": "black"}
LABELS = {"global": "(i) one global threshold, 3 dense steps", "profile": "(ii) calibrated profile",
          "marginal": "(iii) marginal rule (upstream)", "per_call": "(iv) per-call skip-softmax, 3 dense steps",
          "dense": "(v) dense"}


def pareto(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [dict(r, attention_ms=r["attention"]["attention_ms"]) if r.get("attention") else r
            for r in report["methods"]]
    timed = all("attention_ms" in r for r in rows)
    dense = next(r for r in rows if r["kind"] == "dense")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    cost, cost_label = (("attention_ms", "attention time of one generation (ms)") if timed else
                        ("flops_skipped", "attention FLOPs skipped (cost proxy)"))
    panels = ((axes[0], "sparsity", "psnr_mean", "tiles skipped over the run", "PSNR against dense (dB, mean)"),
              (axes[1], cost, "psnr_mean", cost_label, "PSNR against dense (dB, mean)"),
              (axes[2], cost, "overall", cost_label, "evaluator overall score (mean, 95% interval)"))
    for ax, xkey, ykey, xlabel, ylabel in panels:
        if ykey == "overall":
            band = dense["scores"]["overall"]
            ax.axhspan(band["low"], band["high"], color="grey", alpha=0.15, label="dense: 95% interval")
        for kind in ("global", "per_call", "marginal", "profile", "dense"):
            points = [r for r in rows if r["kind"] == kind]
            if not points:
                continue
            xs = [r[xkey] for r in points]
            if ykey == "overall":
                ys = [r["scores"]["overall"]["mean"] for r in points]
                err = [[y - r["scores"]["overall"]["low"] for y, r in zip(ys, points)],
                       [r["scores"]["overall"]["high"] - y for y, r in zip(ys, points)]]
                ax.errorbar(xs, ys, yerr=err, fmt="o", color=COLORS[kind], capsize=3, label=LABELS[kind])
            else:
                if kind == "dense":
                    continue
                ys = [r[ykey] for r in points]
                order = sorted(range(len(xs)), key=lambda i: xs[i])
                style = "-o" if kind in ("global", "per_call") else "o"
                ax.plot([xs[i] for i in order], [ys[i] for i in order], style, color=COLORS[kind], label=LABELS[kind],
                        markersize=7 if kind == "profile" else 5)
            for x, y, r in zip(xs, ys, points):
                ax.annotate(r["method"].split(" ", 1)[-1] if kind != "dense" else "", (x, y),
                            textcoords="offset points", xytext=(4, 3), fontsize=6)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    axes[2].legend(fontsize=6, loc="lower left")
    where = f"testbed on an {report['device']}" if timed else "testbed on a CPU"
    cost_note = ("attention time: CUDA events, one generation" if timed else
                 "time needs a GPU: skipped tiles and FLOPs are the cost proxy")
    fig.suptitle(f"{where}, {report['size']}, {len(report['inputs'])} held-out prompt x seed pairs; {cost_note}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def premise(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = list(report["thresholds"])
    fig, axes = plt.subplots(1, len(thresholds), figsize=(5 * len(thresholds), 4), squeeze=False)
    for ax, th in zip(axes[0], thresholds):
        entry = report["thresholds"][th]
        for layer, values in entry["layers"].items():
            gaps = sorted(int(g) for g in values["persistence"])
            ax.plot(gaps, [values["persistence"][str(g)] for g in gaps], "-o", markersize=3,
                    label=f"{layer} ({100 * sum(values['negligible']) / len(values['negligible']):.0f}% negligible)")
        gaps = sorted(int(g) for g in entry["all"])
        ax.plot(gaps, [entry["all"][str(g)] for g in gaps], "k--", lw=2, label="all layers")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("gap d (denoising steps)")
        ax.set_ylabel("P(negligible at t + d | negligible at t)")
        ax.set_title(f"threshold {th}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower left")
    fig.suptitle(f"the premise on the testbed's dense trajectory ({report['inputs']} prompts, {report['steps']} steps, "
                 f"{report['tokens'][0]} tokens, 128x128 tiles): tiles found negligible at step t, still negligible at "
                 "t + d", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comparison", nargs="*", default=[],
                        help="comparison.json files of one size and inputs (their methods are plotted together)")
    parser.add_argument("--premise")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.comparison:
        reports = [json.loads(Path(p).read_text()) for p in args.comparison]
        for other in reports[1:]:
            if (other["size"], other["inputs"]) != (reports[0]["size"], reports[0]["inputs"]):
                raise SystemExit("--comparison: the files were made at other sizes or on other inputs")
        merged = dict(reports[0], methods=[m for i, r in enumerate(reports) for m in r["methods"]
                                           if i == 0 or m["kind"] != "dense"])
        timed = all(m.get("attention") for m in merged["methods"])
        pareto(merged, out / ("calibration-pareto-gpu.png" if timed else "calibration-pareto-cpu.png"))
    if args.premise:
        premise(json.loads(Path(args.premise).read_text()), out / "calibration-premise-cpu.png")


if __name__ == "__main__":
    main()
