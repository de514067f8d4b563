"""``report.html``: one self-contained page per bundle (FLOPs, parity, samples, recipe, versions).

Sections (each is present even when it has nothing to show, and says so):
  1. summary        — target, source model, image/latent size, schedule, sampler, adaptor
  2. flops          — params and FLOPs per graph (ONNX count, cw_export.bundle.flops) and UNet FLOPs per
                     denoising step
  3. parity-curves  — per-step latent PSNR and guidance ratio std(cond-uncond) vs FP32, per precision/provider
                      (from the manifest's ``parity`` section, which quantized bundles carry; absent for FP32)
  4. parity-table   — per graph: FP32 ORT vs torch (build-time export check) and, where quantized, SQNR
  5. samples        — image grid of the bundle's sample PNGs, where it ships any
  6. recipe / versions
Figures are matplotlib PNGs embedded as base64. The page is a pure function of the manifest and the graph files
(no timestamps, PNG metadata stripped, Agg canvas without pyplot state), so a rebuilt bundle is byte-identical and
``cw-export report BUNDLE`` regenerates exactly the file the build wrote. The manifest's ``files`` list is not read.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

REPORT_NAME = "report.html"
SECTIONS = ("summary", "flops", "parity-curves", "parity-table", "samples", "recipe", "versions")
FIGURE_DPI = 80
_RC = {"font.family": "DejaVu Sans", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": FIGURE_DPI,
       "savefig.dpi": FIGURE_DPI, "path.simplify": False}

_CSS = """body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}pre{background:#f7f7f7;padding:0.5em;overflow:auto}
.note{color:#666;font-size:90%}img{max-width:100%}"""


# --- figures --------------------------------------------------------------------------------------------------------
def _figure(width: float = 7.0, height: float = 3.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    """Deterministic PNG bytes (no Software/creation-time chunks) as a data URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None}, bbox_inches=None)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _flops_figures(report: dict) -> list[tuple[str, str]]:
    import matplotlib

    graphs = report["graphs"]
    schedule = report["schedule"]
    figures = []
    with matplotlib.rc_context(_RC):
        fig = _figure()
        ax = fig.add_subplot(1, 1, 1)
        names = list(graphs)
        conv_linear = [graphs[n]["conv_linear_flops"] / 1e9 for n in names]
        attention = [graphs[n]["attention_flops"] / 1e9 for n in names]
        ax.barh(names, conv_linear, label="conv + linear")
        ax.barh(names, attention, left=conv_linear, label="attention matmuls")
        ax.set_xlabel("GFLOPs per call, batch 1")
        ax.invert_yaxis()
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
        fig.tight_layout()
        figures.append(("GFLOPs per graph (batch 1)", _png(fig)))

        fig = _figure()
        ax = fig.add_subplot(1, 1, 1)
        per_step = schedule["per_step"]
        kinds = schedule["step_kinds"]
        values = [per_step[k]["flops"] / 1e9 for k in kinds]
        colours = ["tab:blue" if k == "full" else "tab:orange" for k in kinds]
        steps = list(range(1, len(kinds) + 1))
        ax.bar(steps, values, color=colours)
        ax.axhline(per_step["full"]["flops"] / 1e9, color="tab:blue", linestyle="--", linewidth=1, label="full step")
        ax.set_xticks(steps)
        ax.set_xlabel("denoising step (blue: full, orange: clocked)")
        ax.set_ylabel("UNet GFLOPs, batch 1")
        ax.set_title(f"{schedule['steps']} steps, clock {schedule['clock']}: saving {schedule['saving_pct']:.1f}% "
                     f"({schedule['conv_linear']['saving_pct']:.1f}% conv+linear)")
        ax.legend(loc="lower right")
        fig.tight_layout()
        figures.append(("UNet GFLOPs per denoising step", _png(fig)))
    return figures


def parity_runs(manifest: dict) -> dict[str, dict]:
    """Per-step parity runs in the manifest, by label (precision/provider); empty when there are none.

    Accepts ``parity`` as one run (``{"steps": [...]}``) or as several (``{label: {"steps": [...]}}``).
    """
    parity = manifest.get("parity")
    if not isinstance(parity, dict):
        return {}
    label = str(manifest.get("target", "quantized"))
    if isinstance(parity.get("steps"), list):
        return {label: parity}
    return {str(k): v for k, v in sorted(parity.items()) if isinstance(v, dict) and isinstance(v.get("steps"), list)}


def _parity_figure(runs: dict[str, dict]) -> str:
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = _figure(7.0, 5.0)
        psnr_ax = fig.add_subplot(2, 1, 1)
        ratio_ax = fig.add_subplot(2, 1, 2, sharex=psnr_ax)
        for label, run in runs.items():
            rows = [r for r in run["steps"] if isinstance(r, dict)]
            steps = [int(r.get("step", i)) + 1 for i, r in enumerate(rows)]
            psnr = [r.get("latent_psnr_db") for r in rows]
            ratio = [r.get("guidance_ratio") for r in rows]
            if all(v is not None for v in psnr):
                psnr_ax.plot(steps, psnr, marker="o", label=label)
            if all(v is not None for v in ratio):
                ratio_ax.plot(steps, ratio, marker="o", label=label)
        psnr_ax.set_ylabel("latent PSNR vs FP32 (dB)")
        ratio_ax.axhline(1.0, color="grey", linewidth=1)
        ratio_ax.set_ylabel("std(cond-uncond) / FP32")
        ratio_ax.set_xlabel("denoising step")
        psnr_ax.legend(loc="best")
        fig.tight_layout()
        return _png(fig)


# --- HTML pieces ----------------------------------------------------------------------------------------------------
def _e(value) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 and value else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{body}\n</section>\n'


def _summary(manifest: dict) -> str:
    schedule = manifest.get("schedule", {})
    latent = manifest.get("latent", {})
    source = manifest.get("source_model", {})
    rows = [
        ["target", manifest.get("target", "?")],
        ["source model", source.get("name") or source.get("path") or source.get("kind", "?")],
        ["source sha256", source.get("sha256") or "-"],
        ["image size", "x".join(str(v) for v in latent.get("image_size", [])) or "?"],
        ["latent shape", latent.get("shape", "?")],
        ["steps / clock", f"{schedule.get('steps', '?')} / {schedule.get('clock', '?')}"],
        ["step kinds", " ".join(k[0].upper() for k in schedule.get("step_kinds", []))
         + "  (F = full UNet, C = clocked: low-res part skipped)"],
        ["sampler", manifest.get("sampler", {}).get("name", "?")],
        ["adaptor", manifest.get("adaptor", {}).get("kind", "?")],
        ["guidance scale / batch", f"{manifest.get('guidance_scale', '?')} / {manifest.get('batch', '?')}"],
        ["tool", f"{manifest.get('tool', {}).get('name', '?')} {manifest.get('tool', {}).get('version', '')}"],
    ]
    return _table(["", ""], rows)


def _flops_section(bundle: Path, manifest: dict) -> str:
    from .flops import a8_share_text, count_bundle, inspect_report

    schedule = manifest["schedule"]
    report = inspect_report(count_bundle(bundle, manifest), manifest["wiring"]["steps"], schedule["steps"],
                            schedule["clock"], {"counter": "onnx"})
    rows = [[name, f"{c['params'] / 1e6:.2f}", f"{c['flops'] / 1e9:.3f}", f"{c['conv_linear_flops'] / 1e9:.3f}",
             f"{c['attention_flops'] / 1e9:.3f}", f"{100 * c['a8_mac_share']:.1f}"]
            for name, c in report["graphs"].items()]
    s = report["schedule"]
    cl = s["conv_linear"]
    totals = _table(["per image (UNet)", "GFLOPs, all steps full", "GFLOPs, clocked", "saving %"], [
        ["all FLOPs, batch 1", f"{s['full_flops'] / 1e9:.2f}", f"{s['clocked_flops'] / 1e9:.2f}", f"{s['saving_pct']:.1f}"],
        ["conv + linear, batch 1", f"{cl['full_flops'] / 1e9:.2f}", f"{cl['clocked_flops'] / 1e9:.2f}",
         f"{cl['saving_pct']:.1f}"],
        ["all FLOPs, CFG batch 2", f"{s['full_flops_cfg'] / 1e9:.2f}", f"{s['clocked_flops_cfg'] / 1e9:.2f}",
         f"{s['saving_pct']:.1f}"],
    ])
    figures = "".join(f'<figure><img alt="{_e(t)}" src="{uri}"><figcaption>{_e(t)}</figcaption></figure>'
                      for t, uri in _flops_figures(report))
    note = ('<p class="note">Counted from the ONNX graphs: 2 x MACs of Conv/ConvTranspose/MatMul/Gemm from '
            "onnx.shape_inference shapes, divided by each graph's batch; params = stored float weight elements "
            "(identical tensors the exporter merged count once). Same numbers as <code>cw-export inspect</code>.</p>")
    a8 = f'<p>8-bit activations: {_e(a8_share_text(report))}.</p>' if a8_share_text(report) else ""
    return (_table(["graph", "params (M)", "GFLOPs", "conv+linear", "attention", "a8 MACs %"], rows) + totals + a8
            + note + figures)


def _parity_curves(manifest: dict) -> str:
    runs = parity_runs(manifest)
    if not runs:
        return ('<p class="note">No per-step parity in this bundle (FP32 bundles are exact up to onnxruntime '
                "rounding; quantized bundles record latent PSNR and guidance ratio per step here).</p>")
    rows = []
    for label, run in runs.items():
        for r in run["steps"]:
            if isinstance(r, dict):
                rows.append([label, int(r.get("step", 0)) + 1, r.get("kind", ""), _fmt(r.get("latent_psnr_db", "")),
                             _fmt(r.get("guidance_ratio", ""), 5)])
    figure = f'<figure><img alt="per-step parity" src="{_parity_figure(runs)}"></figure>'
    return figure + _table(["run", "step", "kind", "latent PSNR dB", "guidance ratio"], rows)


def _parity_table(manifest: dict) -> str:
    runs = parity_runs(manifest)
    rows = []
    for name, graph in sorted(manifest.get("graphs", {}).items()):
        fp32 = graph.get("parity_fp32_vs_torch") or {}
        quant = [run.get("graphs", {}).get(name, {}).get("sqnr_db") for run in runs.values()]
        quant = [q for q in quant if q is not None]
        rows.append([name, graph.get("precision", "?"), _fmt(fp32.get("max_rel_diff", "-")),
                     _fmt(fp32.get("min_sqnr_db", "-")), ", ".join(_fmt(q) for q in quant) or "-"])
    gate = manifest.get("parity", {}).get("gate") if isinstance(manifest.get("parity"), dict) else None
    extra = f"<pre>{_e(json.dumps(gate, indent=2, sort_keys=True))}</pre>" if gate else ""
    return _table(["graph", "precision", "FP32 ORT vs torch: max rel diff", "FP32 SQNR dB",
                   "quantized SQNR dB vs FP32"], rows) + extra


def _samples(bundle: Path, manifest: dict) -> str:
    files = sorted(p for p in (bundle / "samples").glob("*.png")) if (bundle / "samples").is_dir() else []
    if not files:
        return '<p class="note">This bundle ships no sample images.</p>'
    cells = "".join(f'<figure style="display:inline-block;margin:4px"><img src="data:image/png;base64,'
                    f'{base64.b64encode(p.read_bytes()).decode("ascii")}"><figcaption>{_e(p.stem)}</figcaption></figure>'
                    for p in files)
    return f"<div>{cells}</div>"


def render_report(bundle: str | Path, manifest: dict) -> bytes:
    """The report's bytes for ``bundle`` with ``manifest`` (its ``files`` entry is not used)."""
    bundle = Path(bundle)
    title = f"cw-export bundle report: {manifest.get('target', '?')}"
    parts = [
        _section("summary", "Summary", _summary(manifest)),
        _section("flops", "FLOPs per graph and per step", _flops_section(bundle, manifest)),
        _section("parity-curves", "Per-step parity vs FP32", _parity_curves(manifest)),
        _section("parity-table", "Per-graph parity", _parity_table(manifest)),
        _section("samples", "Sample images", _samples(bundle, manifest)),
        _section("recipe", "Recipe", f"<pre>{_e(json.dumps(manifest.get('recipe', {}), indent=2, sort_keys=True))}</pre>"),
        _section("versions", "Versions", _table(["library", "version"],
                                                [[k, v] for k, v in sorted(manifest.get("versions", {}).items())])),
    ]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n<h1>{_e(title)}</h1>\n" + "".join(parts) + "</body></html>\n")
    return page.encode("utf-8")


def write_report(bundle: str | Path, manifest: dict) -> Path:
    """Write ``bundle/report.html`` (call before the manifest's file list is computed)."""
    path = Path(bundle) / REPORT_NAME
    path.write_bytes(render_report(bundle, manifest))
    return path


__all__ = ["REPORT_NAME", "SECTIONS", "render_report", "write_report", "parity_runs"]
