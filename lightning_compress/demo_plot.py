"""The demo's picture: grouped bars, each compressed model as a fraction of dense, for bytes, FLOPs and latency."""

from __future__ import annotations

from pathlib import Path

from lightning_compress.demo_train import DemoResult

COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#8172b3")
METRICS = (  # (group label, attribute of DemoResult)
    ("bytes on disk", "bytes_on_disk"),
    ("FLOPs per image\n(theoretical)", "flops"),
    ("latency per image\n(measured)", "latency_ms"),
)


def ratio_label(ratio: float, latency: bool) -> str:
    if not latency:
        return f"{ratio:.2f}x"
    return f"{ratio:.2f}x ({1 / ratio:.2f}x faster)" if ratio < 1 else f"{ratio:.2f}x (no speed-up)"


def plot(dense: DemoResult, compressed: list[DemoResult], epochs: int, path: Path) -> None:
    """Write ``path`` (PNG): one group of bars per metric, one bar per compressed model, dense = 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 0.8 / len(compressed)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 1.1 * len(METRICS) * len(compressed) / 3))
    largest = 1.0
    for i, result in enumerate(compressed):
        ratios = [getattr(result, attr) / getattr(dense, attr) for _, attr in METRICS]
        largest = max(largest, *ratios)
        positions = [g + (i - (len(compressed) - 1) / 2) * height for g in range(len(METRICS))]
        name = f"{result.label}: {result.test_accuracy:.1%} test accuracy"
        bars = ax.barh(positions, ratios, height=height * 0.9, color=COLOURS[i % len(COLOURS)], label=name)
        labels = [ratio_label(r, latency=attr == "latency_ms") for r, (_, attr) in zip(ratios, METRICS, strict=True)]
        ax.bar_label(bars, labels=labels, padding=3, fontsize=9)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(METRICS)), [name for name, _ in METRICS])
    ax.invert_yaxis()  # first metric on top
    ax.set_xlim(0, largest * 1.55)  # room for the labels right of the longest bar
    ax.set_xlabel("fraction of the dense fp32 model (dashed line = dense = 1.0; shorter is better)")
    ax.set_title(
        f"What compression saved on the reference CNN (digits, {epochs} epochs each)\n"
        f"dense fp32: {dense.test_accuracy:.1%} test accuracy, {dense.bytes_on_disk:,} bytes,"
        f" {dense.latency_ms:.4f} ms per image",
        fontsize=11,
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight" keeps the legend below the axes in the picture
    plt.close(fig)
