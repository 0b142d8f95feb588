"""Bundle figures and tables into a report people read: one self-contained HTML file (images
embedded as base64, opens anywhere, mails as one attachment) and a markdown file beside the
PNGs (renders on GitHub). Both hold the same sections in the same order.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from analysis.plots import save
from planner.fsio import atomic_path, atomic_write_text

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } p.caption { color: #555; font-size: 0.9em; }
"""


@dataclass(slots=True)
class _Section:
    kind: str  # "heading" | "text" | "figure" | "table"
    text: str = ""
    png: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


@dataclass(slots=True)
class Report:
    """A report under construction. `figure` saves its PNG at once (so memory is freed)."""

    out_dir: Path
    title: str
    sections: list[_Section] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            from planner.errors import ChunkftError

            raise ChunkftError(f"cannot create report directory {str(self.out_dir)!r}: {e.strerror or e}") from None

    def heading(self, text: str) -> None:
        self.sections.append(_Section("heading", text=text))

    def text(self, text: str) -> None:
        self.sections.append(_Section("text", text=text))

    def figure(self, name: str, fig: Figure, caption: str = "") -> Path:
        """Save `fig` as out_dir/name.png and add it; returns the PNG's path."""
        path = self.out_dir / f"{name}.png"
        with atomic_path(path) as tmp:
            save(fig, tmp.with_suffix(".png"))
            os.replace(tmp.with_suffix(".png"), tmp)
        self.sections.append(_Section("figure", text=caption, png=path.name))
        return path

    def table(self, header: list[str], rows: list[list[str]], caption: str = "") -> None:
        self.sections.append(_Section("table", text=caption, header=list(header),
                                      rows=[[str(c) for c in r] for r in rows]))

    def to_html(self) -> str:
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"]
        for s in self.sections:
            if s.kind == "heading":
                parts.append(f"<h2>{html.escape(s.text)}</h2>")
            elif s.kind == "text":
                parts.append(f"<p>{html.escape(s.text)}</p>")
            elif s.kind == "figure":
                data = base64.b64encode((self.out_dir / s.png).read_bytes()).decode("ascii")
                parts.append(f"<img alt='{html.escape(s.png)}' src='data:image/png;base64,{data}'>")
                if s.text:
                    parts.append(f"<p class='caption'>{html.escape(s.text)}</p>")
            elif s.kind == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in s.header)
                body = "".join(
                    "<tr>" + "".join(f"<td{_num_class(c)}>{html.escape(c)}</td>" for c in r) + "</tr>"
                    for r in s.rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
                if s.text:
                    parts.append(f"<p class='caption'>{html.escape(s.text)}</p>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for s in self.sections:
            if s.kind == "heading":
                lines += [f"## {s.text}", ""]
            elif s.kind == "text":
                lines += [s.text, ""]
            elif s.kind == "figure":
                lines += [f"![{s.png}]({s.png})", ""]
                if s.text:
                    lines += [f"*{s.text}*", ""]
            elif s.kind == "table":
                lines.append("| " + " | ".join(h.replace("|", "\\|") for h in s.header) + " |")
                lines.append("|" + "|".join("---" for _ in s.header) + "|")
                lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in s.rows]
                lines.append("")
                if s.text:
                    lines += [f"*{s.text}*", ""]
        return "\n".join(lines)

    def write(self) -> tuple[Path, Path]:
        """Write report.html (self-contained) and report.md (beside the PNGs)."""
        html_path, md_path = self.out_dir / "report.html", self.out_dir / "report.md"
        atomic_write_text(html_path, self.to_html())
        atomic_write_text(md_path, self.to_markdown())
        return html_path, md_path


# What each command writes into its output directory, and its report's title (how a directory
# tells whose report it holds). compare's memory_<tier> figures: one per tier in the timeline.
COMPARE_TITLE = "chunkft: predicted vs measured memory"
PLAN_REPORT_TITLE_PREFIX = "chunkft: what fits for "
REPORT_FILES = {
    "compare": ("report.html", "report.md", "error_table.png", "errors.png", "memory_gpu.png", "memory_host.png",
                "memory_disk.png", "chunk_switch.png", "peaks.csv", "phases.csv"),
    "report": ("report.html", "report.md", "fit_map.png", "chunk_sweep.png", "sizing.png", "fit_map.csv",
               "chunk_sweep.csv", "sizing.csv"),
}


def report_owner(out_dir: Path) -> str | None:
    """"compare" or "report" if out_dir/report.md is that command's report, else None."""
    try:
        with open(out_dir / "report.md", encoding="utf-8", errors="replace") as f:
            first = f.readline().strip()
    except OSError:
        return None
    if first == f"# {COMPARE_TITLE}":
        return "compare"
    if first.startswith(f"# {PLAN_REPORT_TITLE_PREFIX}"):
        return "report"
    return None


def check_report_dir(out_dir: str | os.PathLike, command: str, *, force: bool) -> Path:
    """Refuse, before any work, an output directory whose files this command would replace
    unless they are this command's own earlier report (a rerun) or --force says so."""
    from planner.errors import ChunkftError
    from planner.fsio import check_output_dir

    out_dir = check_output_dir(out_dir, "-o/--out")
    if force or not out_dir.is_dir():
        return out_dir
    clashes = [name for name in REPORT_FILES[command] if (out_dir / name).exists()]
    owner = report_owner(out_dir)
    if clashes and owner != command:
        whose = f"a `chunkft {owner}` report" if owner else "files this command did not write"
        raise ChunkftError(f"output directory {str(out_dir)!r} holds {whose} ({', '.join(clashes[:3])}); "
                           f"give another -o directory, or --force to replace them")
    return out_dir


def _num_class(cell: str) -> str:
    head = cell.lstrip("+-")
    return " class='num'" if head[:1].isdigit() else ""



def write_compare_report(comparison, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Figures, tables (also as CSV) and report.html / report.md for one comparison."""
    from analysis import plots
    from planner.units import format_bytes

    p, m = comparison.predicted, comparison.measured
    report = Report(Path(out_dir), COMPARE_TITLE)
    counts = comparison.match_counts()
    report.text(f"Timeline {p.path} ({p.t_unit}) against trace {m.path} ({m.t_unit}); model "
                f"{p.model_fingerprint[:12]}, plan {p.plan_fingerprint[:12]}. {counts['matched']} of "
                f"{counts['measured']} measured events aligned by (tier, step, phase, layer, event) "
                f"ordinal to {counts['predicted']} predicted events."
                + ("" if comparison.measured_step is None else
                   f" The trace's step {comparison.measured_step} (of steps "
                   f"{int(m.events['step'].min())}-{int(m.events['step'].max())}) is compared."))
    report.heading("Peaks")
    header, rows = plots.error_table_rows(comparison)
    report.table(header, rows, "error = measured - predicted; relative = error / predicted.")
    report.figure("error_table", plots.error_table(comparison))
    report.figure("errors", plots.errors(comparison),
                  "Peak per tier and per phase; labels give (measured - predicted) / predicted.")
    report.heading("Memory over the step")
    for tier in [t for t in ("gpu", "host", "disk") if (comparison.predicted_events["tier"] == t).any()]:
        report.figure(f"memory_{tier}", plots.memory_over_step(comparison, tier),
                      f"{tier.upper()}: predicted bytes stacked by component; measured as a black line.")
    report.heading("Chunk switch")
    fig = plots.chunk_switch(comparison)
    if fig is None:
        report.text("The timeline holds no chunk switch (a one-chunk plan, or a step without a switch).")
    else:
        report.figure("chunk_switch", fig, "Bytes per tier across the first chunk switch; "
                      "bars: each transfer's bytes into (+) or out of (-) its tier.")
    report.heading("Components at the GPU peak")
    from analysis.compare import components_at_peak

    parts = components_at_peak(comparison.predicted_events, comparison.measured_events, "gpu")
    parts = parts[(parts["predicted_bytes"] > 0) | (parts["measured_bytes"] > 0)]
    report.table(["component", "predicted", "measured"],
                 [[c, format_bytes(int(r.predicted_bytes)), format_bytes(int(r.measured_bytes))]
                  for c, r in parts.iterrows()],
                 "Bytes per component at each side's allocated peak. A trace's components are the "
                 "runtime's own accounting (what it holds by design), so what it does not account "
                 "(activations, temporaries) shows as 0 B there.")
    report.heading("Error per phase")
    ph = comparison.phases
    report.table(
        ["tier", "phase", "predicted peak", "measured peak", "error", "relative", "matched events",
         "mean |error|"],
        [[r.tier, r.phase, _fmt(r.predicted_bytes, format_bytes), _fmt(r.measured_bytes, format_bytes),
          _fmt(r.error_bytes, format_bytes, signed=True),
          "n/a" if r.relative_error != r.relative_error else f"{r.relative_error * 100:+.1f}%",
          str(r.matched_events),
          "n/a" if r.mean_abs_error_bytes != r.mean_abs_error_bytes else format_bytes(r.mean_abs_error_bytes)]
         for r in ph.itertuples(index=False)])
    atomic_write_text(report.out_dir / "peaks.csv", comparison.peaks.to_csv(index=False))
    atomic_write_text(report.out_dir / "phases.csv", comparison.phases.to_csv(index=False))
    return report.write()


def _fmt(value, format_bytes, *, signed: bool = False) -> str:
    try:
        text = format_bytes(int(value))
        return "+" + text if signed and int(value) > 0 else text
    except (TypeError, ValueError):
        return "n/a"


def write_plan_report(sweep, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Fit map, chunk sweep and sizing figures, their tables (also as CSV) and the report."""
    from analysis import plan_plots
    from planner.units import format_bytes

    report = Report(Path(out_dir), f"{PLAN_REPORT_TITLE_PREFIX}{sweep.model}")
    report.text(f"Budget: {format_bytes(sweep.budget.gpu_bytes)} GPU (what the caching allocator may "
                f"reserve), host {format_bytes(sweep.budget.host_bytes) if sweep.budget.host_bytes else 'unlimited'}. "
                f"Step times predicted for {sweep.gpu_profile}.")
    report.heading("Fit map")
    report.figure("fit_map", plan_plots.fit_map(sweep), "Green: every tier fits the budget.")
    report.heading("Chunk count")
    report.figure("chunk_sweep", plan_plots.chunk_sweep(sweep))
    report.table(["family", "chunks", "GPU need", "host", "step time", "fits"],
                 [[r.family, str(r.chunks), format_bytes(r.gpu_need_bytes), format_bytes(r.host_bytes),
                   f"{r.step_time_s:.3g} s", "yes" if r.fits else "no"]
                  for r in sweep.chunk_sweep.itertuples(index=False)])
    report.heading("Sizing across the GPU catalogue")
    report.figure("sizing", plan_plots.sizing(sweep))
    report.table(["strategy", "card needs", "host", "step time", "catalogue GPUs that suffice"],
                 [[r.strategy, format_bytes(r.card_bytes), format_bytes(r.host_bytes), f"{r.step_time_s:.3g} s",
                   r.gpus_that_fit or "none (shard across GPUs)"] for r in sweep.sizing.itertuples(index=False)])
    for name in ("fit_map", "chunk_sweep", "sizing"):
        atomic_write_text(report.out_dir / f"{name}.csv", getattr(sweep, name).to_csv(index=False))
    return report.write()


__all__ = ["Report", "check_report_dir", "report_owner", "write_compare_report", "write_plan_report"]
