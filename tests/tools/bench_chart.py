"""Draws the README's gateway benchmark chart: the p50 ratio to the Envoy without a filter, per
write size, for each Envoy of the breakdown, from the figures `make bench-gateway` saved.

    python3 tests/tools/bench_chart.py [.run/bench/gateway.json] [docs/gateway-bench.png]

`make bench-chart` runs it in a venv of its own with matplotlib (the only thing it needs)."""

import json
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    root = Path(__file__).resolve().parents[2]
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else root / ".run/bench/gateway.json"
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else root / "docs/gateway-bench.png"
    rows = json.loads(source.read_text())
    if not rows:
        sys.exit(f"{source} has no figures")
    labels = rows[0]["labels"]
    cases = [f"{r['case']}\n{r['bytes'] / 1e6:.2f} MB" if r["bytes"] >= 100_000 else f"{r['case']}\n{r['bytes'] / 1e3:.1f} KB"
             for r in rows]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(11, 5), dpi=110)
    for i, label in enumerate(labels):
        ratios = [r["p50_us"][i] / r["p50_us"][0] for r in rows]
        xs = [c + (i - (len(labels) - 1) / 2) * width for c in range(len(rows))]
        bars = ax.bar(xs, ratios, width, label=label)
        if i == len(labels) - 1:
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    # Ratios span 1x to tens of x (many small rows): a log scale keeps the small ones readable.
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xticks(range(len(rows)), cases, fontsize=8)
    ax.set_ylabel("p50 latency ÷ Envoy without a filter")
    ax.set_title("Writes through Envoy 1.40 (one worker), same run; the last bar is the product")
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target)
    print(f"chart written to {target}")


if __name__ == "__main__":
    main()
