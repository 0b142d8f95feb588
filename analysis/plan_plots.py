"""Figures for `chunkft report`: fit map, chunk sweep, sizing across the GPU catalogue.

Each takes a `Sweep` (analysis.sweep) and returns a matplotlib Figure; bytes in GiB.
"""

from __future__ import annotations

import math
import textwrap

import matplotlib

matplotlib.use("Agg")  # no display: figures are files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from analysis.plots import GIB, apply_style, byte_unit  # noqa: E402
from analysis.sweep import Sweep  # noqa: E402
from planner.units import format_bytes  # noqa: E402

FITS, MISSES = "#a1d99b", "#fc9272"


def fit_map(sweep: Sweep) -> Figure:
    """One panel per strategy: sequence length x batch, green where every tier fits, red where
    not; each cell shows the GPU bytes the budget must hold."""
    apply_style()
    df = sweep.fit_map
    strategies = list(dict.fromkeys(df["strategy"]))
    seqs = sorted(set(df["seq_len"]))
    batches = sorted(set(df["batch"]))
    ncols = 2 if len(strategies) <= 4 else 3  # 4 strategies: a 2 x 2 grid, no empty panel
    nrows = math.ceil(len(strategies) / ncols)
    div, unit = byte_unit(float(df["gpu_need_bytes"].max()))
    fig, axes = plt.subplots(nrows, ncols, figsize=(9.0, 1.2 + nrows * (0.9 + 0.42 * len(seqs))),
                             squeeze=False, sharex=True, sharey=True)
    for ax, strategy in zip(axes.flat, strategies):
        part = df[df["strategy"] == strategy]
        grid = np.zeros((len(seqs), len(batches)))
        for r in part.itertuples(index=False):
            i, j = seqs.index(r.seq_len), batches.index(r.batch)
            grid[i, j] = 1.0 if r.fits else 0.0
            ax.text(j, i, f"{r.gpu_need_bytes / div:.1f}", ha="center", va="center", fontsize=8)
        ax.imshow(grid, cmap=matplotlib.colors.ListedColormap([MISSES, FITS]), vmin=0, vmax=1,
                  aspect="auto", origin="lower")
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_yticks(range(len(seqs)), [str(s) for s in seqs])
        ax.set_title(textwrap.fill(strategy, 34), fontsize=8.5)
    for ax in axes.flat[len(strategies):]:
        ax.axis("off")
    fig.supylabel("sequence length (tokens)", fontsize=10)
    fig.supxlabel("batch size", fontsize=10, y=0.06)
    fig.legend(handles=[Patch(color=FITS, label="fits every tier"), Patch(color=MISSES, label="does not fit")],
               loc="lower center", ncol=2, bbox_to_anchor=(0.5, -0.02), frameon=False)
    fig.suptitle(f"Fit map: {sweep.model} within {format_bytes(sweep.budget.gpu_bytes)} GPU"
                 + (f", {format_bytes(sweep.budget.host_bytes)} host" if sweep.budget.host_bytes else "")
                 + f"\n(cell: GPU {unit} the budget must hold)", fontsize=10.5)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def chunk_sweep(sweep: Sweep) -> Figure:
    """GPU peak and predicted step time against chunk count, per ChunkFT family."""
    apply_style()
    df = sweep.chunk_sweep
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 4.2))
    div, unit = byte_unit(float(max(df["gpu_need_bytes"].max(), sweep.budget.gpu_bytes)))
    for k, (family, part) in enumerate(df.groupby("family", sort=False)):
        colour = f"C{k}"
        left.plot(part["chunks"], part["gpu_need_bytes"] / div, marker="o", color=colour, label=family)
        right.plot(part["chunks"], part["step_time_s"], marker="s", color=colour, label=family)
    left.axhline(sweep.budget.gpu_bytes / div, color="#d62728", ls="--", lw=1.2,
                 label=f"budget {format_bytes(sweep.budget.gpu_bytes)}")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ticks = sorted(set(df["chunks"]))
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("chunk count C")
        ax.grid(True, alpha=0.3)
    left.set_ylabel(f"GPU memory needed ({unit})")
    left.set_ylim(bottom=0)
    left.set_title("GPU peak (allocator reservation)")
    right.set_ylabel("predicted step time (s)")
    right.set_ylim(bottom=0)
    right.set_title(f"Step time on {sweep.gpu_profile}")
    left.legend(fontsize=8)
    fig.suptitle(f"{sweep.model}, seq {sweep.reference_seq_len}, batch {sweep.reference_batch}: "
                 "ChunkFT against chunk count", fontsize=10.5)
    fig.tight_layout()
    return fig


def sizing(sweep: Sweep) -> Figure:
    """Per strategy, the GPU memory a card needs, against the catalogue's memory sizes."""
    apply_style()
    df = sweep.sizing
    fig, ax = plt.subplots(figsize=(9.0, 4.8))
    y = np.arange(len(df))
    need = df["card_bytes"].to_numpy() / GIB  # against the catalogue's cards: always GiB
    ax.barh(y, need, color="#1f77b4", height=0.6)
    for yi, v, card, host in zip(y, need, df["card_bytes"], df["host_bytes"]):
        ax.text(v, yi, f" {format_bytes(int(card))}" + (f" (host {format_bytes(int(host))})" if host else ""),
                va="center", fontsize=8)
    # One dotted line per catalogue memory size (to the GiB), named on a top axis.
    sizes: dict[int, list[str]] = {}
    for name, mem in zip(sweep.catalogue["gpu"], sweep.catalogue["memory_bytes"]):
        sizes.setdefault(round(mem / GIB), []).append(name)
    top = max([*need, *sizes]) * 1.15
    for gib in sizes:
        ax.axvline(gib, color="#555555", ls=":", lw=1)
    # Sizes a few GiB apart (22 and 24 GiB cards) share one label, or the labels collide.
    clusters: list[list[int]] = []
    for gib in sorted(sizes):
        if clusters and gib - clusters[-1][-1] <= 0.06 * top:
            clusters[-1].append(gib)
        else:
            clusters.append([gib])
    names = ax.secondary_xaxis("top")
    names.set_xticks([c[0] for c in clusters], [", ".join(n for g in c for n in sizes[g]) for c in clusters],
                     rotation=30, ha="left", fontsize=7.5)
    ax.set_yticks(y, [textwrap.fill(label, 30) for label in df["strategy"]], fontsize=8.5)
    ax.set_xlim(0, top)
    ax.set_ylim(len(df) - 0.4, -0.6)
    ax.set_xlabel("GPU memory a card needs: reservation + CUDA context (GiB); dotted: GPU sizes")
    ax.set_title(f"Sizing: {sweep.model}, seq {sweep.reference_seq_len}, batch {sweep.reference_batch}; "
                 "top: catalogue GPUs", fontsize=10.5)
    fig.tight_layout()
    return fig
