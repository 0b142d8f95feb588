"""Figures for `chunkft compare`: memory over the step, a chunk switch, the error table.

Every function returns a matplotlib Figure (Agg backend, no display) sized to be read at
about 800-900 px wide; `save` writes it as PNG. Bytes are plotted in GiB (2**30), or in MiB
when a figure's largest value is under 1 GiB (tiny CPU models), and the axis says which.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display: figures are files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from analysis.compare import Comparison, cpu_equivalent, positions_on_predicted  # noqa: E402
from analysis.load import COMPONENT_COLUMNS  # noqa: E402
from planner.units import format_bytes  # noqa: E402

GIB = 2**30
DPI = 100
WIDE = (9.0, 5.0)  # inches at DPI: 900 px wide

# One colour per Component, stable across figures (matplotlib's tab10 order).
COMPONENT_COLOURS: dict[str, str] = dict(zip(COMPONENT_COLUMNS, [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
]))
TIER_STYLES: dict[str, str] = {"gpu": "-", "host": "--", "disk": ":"}
TIER_COLOURS: dict[str, str] = {"gpu": "#1f77b4", "host": "#ff7f0e", "disk": "#2ca02c"}
PHASE_SHADES = ("#f2f2f2", "#ffffff")
PHASE_COLOURS: dict[str, str] = {
    "setup": "#cccccc", "forward": "#6baed6", "loss": "#e377c2", "backward": "#fd8d3c",
    "recompute": "#9e9ac8", "optimizer": "#74c476", "chunk_switch": "#636363",
}


def byte_unit(max_bytes: float) -> tuple[int, str]:
    """(divisor, name): GiB for figures that reach 1 GiB, MiB below."""
    return (GIB, "GiB") if max_bytes >= GIB else (2**20, "MiB")


def apply_style() -> None:
    """The font sizes every chunkft figure uses (analysis.plots and analysis.plan_plots)."""
    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 8.5})


def save(fig: Figure, path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _x_label(comparison: Comparison) -> str:
    unit = "op index" if comparison.predicted.t_unit == "op" else "time (s)"
    return f"timeline {unit} (measured events placed by event alignment)"


def _phase_ribbon(ax, events: pd.DataFrame) -> list:
    """A coloured strip along the top of the axes, one colour per phase; returns legend handles
    for the phases present. (Alternating bands with text labels drown in the dozens of
    backward/recompute alternations an activation-checkpointed step has.)"""
    from matplotlib.patches import Patch

    if events.empty:
        return []
    phase = events["phase"].fillna("").to_numpy()
    t = events["t"].to_numpy()
    starts = [0] + [i for i in range(1, len(phase)) if phase[i] != phase[i - 1]]
    ends = starts[1:] + [len(phase)]
    for a, b in zip(starts, ends):
        if phase[a]:
            x1 = t[b] if b < len(t) else t[-1]
            ax.axvspan(t[a], x1, ymin=0.965, ymax=1.0, color=PHASE_COLOURS.get(phase[a], "#999999"), lw=0,
                       zorder=6)
    present = [p for p in dict.fromkeys(phase) if p]
    return [Patch(color=PHASE_COLOURS.get(p, "#999999"), label=p) for p in present]


def _extend_to(x: np.ndarray, ys: list[np.ndarray], end: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Repeat the last point at `end`: a tier keeps its bytes until the step ends, even when
    its last event came earlier (files write rows only for the tier an event touched)."""
    if len(x) and x[-1] < end:
        return np.append(x, end), [np.append(y, y[-1]) for y in ys]
    return x, ys


def memory_over_step(comparison: Comparison, tier: str = "gpu") -> Figure:
    """Predicted bytes stacked by component, predicted reserved, measured allocated (and
    reserved) as lines, both peaks marked; a phase ribbon along the top."""
    apply_style()
    p_all = comparison.predicted_events
    p = p_all[p_all["tier"] == tier]
    m_all = comparison.measured_events
    m = m_all[m_all["tier"] == tier]
    div, unit = byte_unit(max([float(d[c].max()) for d in (p, m) if len(d) for c in ("peak", "reserved")] or [0]))
    fig, ax = plt.subplots(figsize=WIDE)
    phase_handles = _phase_ribbon(ax, p_all)
    end = float(p_all["t"].max()) if len(p_all) else 0.0
    present = [c for c in COMPONENT_COLUMNS if (p[c] > 0).any()]
    if present:
        x, ys = _extend_to(p["t"].to_numpy(), [p[c].to_numpy() / div for c in present], end)
        ax.stackplot(x, *ys, step="post", labels=[f"predicted: {c}" for c in present],
                     colors=[COMPONENT_COLOURS[c] for c in present], alpha=0.75, zorder=1)
    else:
        x, (y,) = _extend_to(p["t"].to_numpy(), [p["allocated"].to_numpy() / div], end)
        ax.step(x, y, where="post", label="predicted allocated", zorder=1)
    if len(p) and (p["reserved"] != p["allocated"]).any():
        x, (y,) = _extend_to(p["t"].to_numpy(), [p["reserved"].to_numpy() / div], end)
        ax.step(x, y, where="post", color="#1f77b4", lw=1.2, ls="--", label="predicted reserved", zorder=2)
    if len(p):
        at = p.loc[p["allocated"].idxmax()]
        ax.plot([at["t"]], [at["allocated"] / div], marker="v", color="black", ms=8, ls="none",
                label=f"predicted peak {format_bytes(int(at['allocated']))}", zorder=4)
    cpu_trace = comparison.measured.header.get("allocator") == "cpu"
    if cpu_trace and tier == "gpu" and len(p):
        eq = cpu_equivalent(p_all)
        x, (y,) = _extend_to(eq["t"].to_numpy(), [eq["peak"].to_numpy() / div], end)
        ax.step(x, y, where="post", color="#006d2c", lw=1.4,
                label="predicted CPU heap\n(GPU + host - CUDA-only)", zorder=3)
    if len(m):
        mx = positions_on_predicted(p, m)
        unplaced = int(np.isnan(mx).sum())
        # An event the timeline has no counterpart for is drawn where the trace's previous
        # (else next) placed event is, so the line and the peak marker keep every sample.
        mx = pd.Series(mx).ffill().bfill().to_numpy()
        keep = ~np.isnan(mx)
        mm = m[keep]
        order = np.argsort(mx[keep], kind="stable")
        xs, (alloc, reserved) = _extend_to(
            mx[keep][order], [mm["allocated"].to_numpy()[order] / div, mm["reserved"].to_numpy()[order] / div], end)
        ax.step(xs, alloc, where="post", color="black", lw=1.6, label="measured allocated", zorder=3)
        if (mm["reserved"] != mm["allocated"]).any():
            ax.step(xs, reserved, where="post", color="black", lw=1.0, ls=":", label="measured reserved", zorder=3)
        if len(mm):
            k = int(np.argmax(mm["peak"].to_numpy()))
            ax.plot([mx[keep][k]], [mm["peak"].iloc[k] / div], marker="^", color="#d62728", ms=8,
                    ls="none", label=f"measured peak {format_bytes(int(mm['peak'].iloc[k]))}", zorder=5)
        if unplaced:
            ax.text(0.01, 0.01, f"{unplaced} measured events without a timeline counterpart drawn at the "
                    "previous measured event", transform=ax.transAxes, fontsize=8, color="#555555")
    ax.set_xlabel(_x_label(comparison))
    ax.set_ylabel(f"{tier.upper()} memory ({unit})")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.04)  # headroom for the phase ribbon
    if len(p_all):
        ax.set_xlim(float(p_all["t"].min()), end)
    ax.set_title(f"{tier.upper()} memory over the step: predicted (stacked by component) vs measured")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if phase_handles:  # a figure legend: tight bounding boxes count it (a second axes legend is not)
        fig.legend(handles=phase_handles, title="phase (strip along the top)", loc="upper center",
                   bbox_to_anchor=(0.45, 0.0), frameon=False, fontsize=8.5, title_fontsize=8.5,
                   ncol=len(phase_handles), handlelength=1.2, columnspacing=1.0)
    return fig


def _switch_window(events: pd.DataFrame, margin: int) -> pd.DataFrame | None:
    """The first chunk switch's events (all tiers), with `margin` timeline points either side."""
    is_switch = (events["phase"] == "chunk_switch") | (events["event"] == "chunk_switch")
    if not is_switch.any():
        return None
    times = np.sort(events["t"].unique())
    first = events.loc[is_switch.idxmax(), "t"]
    # The first switch ends where the chunk_switch phase run ends.
    run = is_switch.to_numpy()
    i0 = int(np.argmax(run))
    i1 = i0
    while i1 + 1 < len(run) and run[i1 + 1]:
        i1 += 1
    last = events["t"].iloc[i1]
    lo = times[max(0, np.searchsorted(times, first) - margin)]
    hi = times[min(len(times) - 1, np.searchsorted(times, last) + margin)]
    return events[(events["t"] >= lo) & (events["t"] <= hi)]


def _tier_state(events: pd.DataFrame) -> pd.DataFrame:
    """Allocated bytes of every tier after each event: a tier keeps its last value between its
    own events (files write a row only for the tier an event touched)."""
    state = events.pivot_table(index="t", columns="tier", values="allocated", aggfunc="last", sort=False)
    return state.sort_index().ffill()


def chunk_switch(comparison: Comparison, margin: int = 5) -> Figure | None:
    """Bytes per tier across the first chunk switch, with each transfer's size; None when the
    timeline holds no chunk switch."""
    apply_style()
    p_all = comparison.predicted_events
    window = _switch_window(p_all, margin)
    if window is None:
        return None
    lo, hi = window["t"].min(), window["t"].max()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9.0, 6.0), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1.2]})
    state = _tier_state(p_all)
    state = state[(state.index >= lo) & (state.index <= hi)]
    div, unit = byte_unit(float(state.max().max()))
    m_all = comparison.measured_events
    for tier in [t for t in TIER_COLOURS if t in state.columns]:
        colour = TIER_COLOURS[tier]
        top.step(state.index, state[tier] / div, where="post", ls=TIER_STYLES.get(tier, "-"), lw=2,
                 color=colour, label=f"predicted {tier}")
        m = m_all[m_all["tier"] == tier]
        if len(m):
            mx = positions_on_predicted(p_all[p_all["tier"] == tier], m)
            inside = (mx >= lo) & (mx <= hi)
            if inside.any():
                top.plot(mx[inside], m["allocated"].to_numpy()[inside] / div, ls="none", marker="o",
                         ms=5, color=colour, mec="black", label=f"measured {tier}")
    switch = window[(window["phase"] == "chunk_switch") | (window["event"] == "chunk_switch")]["t"]
    for ax in (top, bottom):
        ax.axvspan(switch.min(), switch.max(), color=PHASE_SHADES[0], zorder=0, lw=0)
    top.text((switch.min() + switch.max()) / 2, 1.0, "chunk switch", transform=top.get_xaxis_transform(),
             ha="center", va="bottom", fontsize=8, color="#555555")
    top.set_ylabel(f"memory per tier ({unit})")
    top.set_ylim(bottom=0)
    top.set_title("Chunk switch: bytes per tier (lines predicted, dots measured) and transfers", pad=14)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)

    # A transfer's size is the change of its tier's bytes since that tier's previous event.
    deltas = p_all.groupby("tier", sort=False)["allocated"].diff().fillna(0)
    transfers = window[window["event"] == "transfer"]
    if len(transfers):
        sizes = (deltas.loc[transfers.index] / div).to_numpy()
        bottom.bar(transfers["t"], sizes, width=0.6, color=["#2ca02c" if v >= 0 else "#d62728" for v in sizes])
        lines = []
        for i, (t, v, name, tier) in enumerate(zip(transfers["t"], sizes, transfers["name"], transfers["tier"]), 1):
            bottom.annotate(str(i), (t, v), ha="center", va="bottom" if v >= 0 else "top", fontsize=9,
                            xytext=(0, 2 if v >= 0 else -2), textcoords="offset points")
            lines.append(f"{i}: {name or 'transfer'} [{tier}] {v:+.2f} {unit}")
        lim = max(float(np.abs(sizes).max()), 1e-9) * 1.4
        bottom.set_ylim(-lim, lim)
        listing = lines[:12] + ([f"... and {len(lines) - 12} more"] if len(lines) > 12 else [])
        fig.text(0.01, 0.0, "Transfers:\n" + "\n".join(listing), va="top", ha="left", fontsize=8.5)
    else:
        bottom.text(0.5, 0.5, "no transfer events in this window", transform=bottom.transAxes,
                    ha="center", va="center", color="#555555")
    bottom.axhline(0, color="black", lw=0.8)
    bottom.set_ylabel(f"transfer ({unit})\n+ into tier, - out")
    bottom.set_xlabel(_x_label(comparison))
    fig.tight_layout()
    return fig


def errors(comparison: Comparison) -> Figure:
    """Peak per tier and peak per phase, predicted vs measured, labelled with relative error."""
    apply_style()
    peaks = comparison.peaks[comparison.peaks["metric"].isin(["allocated", "cpu-equivalent"])]
    phases = comparison.phases
    tier = "gpu" if (phases["tier"] == "gpu").any() else (phases["tier"].iloc[0] if len(phases) else "gpu")
    phases = phases[phases["tier"] == tier]
    div, unit = byte_unit(float(pd.concat([peaks["predicted_bytes"], peaks["measured_bytes"]]).astype("float64").max()))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 4.6),
                                      gridspec_kw={"width_ratios": [max(len(peaks), 1), max(len(phases), 2)]})
    for ax, table, labels, title in (
        (left, peaks, peaks["tier"].str.upper(), "Peak per tier"),
        (right, phases, phases["phase"], f"{tier.upper()} peak per phase"),
    ):
        pos = np.arange(len(table))
        pred = table["predicted_bytes"].astype("float64").fillna(0).to_numpy() / div
        meas = table["measured_bytes"].astype("float64").fillna(0).to_numpy() / div
        ax.bar(pos - 0.2, pred, width=0.4, label="predicted", color="#1f77b4")
        ax.bar(pos + 0.2, meas, width=0.4, label="measured", color="#7f7f7f")
        for x, top, rel in zip(pos, np.maximum(pred, meas), table["relative_error"]):
            text = "n/a" if pd.isna(rel) else f"{rel * 100:+.1f}%"
            ax.text(x, top, text, ha="center", va="bottom", fontsize=8.5)
        ax.set_xticks(pos, labels, rotation=30 if len(table) > 4 else 0, ha="right" if len(table) > 4 else "center")
        ax.set_ylabel(f"peak allocated ({unit})")
        ax.set_ylim(0, max([*pred, *meas, 1e-9]) * 1.15)
        ax.set_title(title)
    right.legend(loc="upper right", frameon=True)
    fig.suptitle("Predicted vs measured peaks (label: (measured - predicted) / predicted)", fontsize=11)
    fig.tight_layout()
    return fig


def error_table_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """The peak table as text: header and rows (shared by the PNG and the report)."""
    header = ["tier", "metric", "predicted", "measured", "error", "relative",
              "predicted peak at", "measured peak at"]
    rows = []
    for r in comparison.peaks.itertuples(index=False):
        def fmt(v):
            return "n/a" if pd.isna(v) else format_bytes(int(v))

        def where(side):
            t = getattr(r, f"{side}_t")
            if pd.isna(t):
                return "n/a"
            unit = comparison.predicted.t_unit if side == "predicted" else comparison.measured.t_unit
            tt = f"op {int(t)}" if unit == "op" else f"{t:.4g} s"
            layer = getattr(r, f"{side}_layer")
            bits = [tt, getattr(r, f"{side}_event"), getattr(r, f"{side}_phase") or ""]
            if layer is not None and not pd.isna(layer):
                bits.append(f"layer {int(layer)}")
            return ", ".join(b for b in bits if b)

        rel = "n/a" if pd.isna(r.relative_error) else f"{r.relative_error * 100:+.1f}%"
        error = fmt(r.error_bytes)
        if not pd.isna(r.error_bytes) and r.error_bytes > 0:
            error = "+" + error
        rows.append([r.tier, r.metric, fmt(r.predicted_bytes), fmt(r.measured_bytes), error, rel, where("predicted"), where("measured")])
    return header, rows


def error_table(comparison: Comparison) -> Figure:
    """The peak table rendered as an image."""
    apply_style()
    header, rows = error_table_rows(comparison)
    fig, ax = plt.subplots(figsize=(9.0, 0.9 + 0.38 * max(len(rows), 1)))
    ax.axis("off")
    table = ax.table(cellText=rows or [["-"] * len(header)], colLabels=header, loc="center",
                     cellLoc="left", colLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8.5)
    table.auto_set_column_width(list(range(len(header))))
    table.scale(1.0, 1.4)
    counts = comparison.match_counts()
    ax.set_title(f"Peak error per tier ({counts['matched']} of {counts['measured']} measured events "
                 f"aligned to {counts['predicted']} predicted)", fontsize=10)
    return fig
