"""The benchmark's result document as a Markdown table and a PNG chart (see :mod:`regiondrag.engine.bench`)."""
from __future__ import annotations

from pathlib import Path



def _backend_rank(doc: dict):
    """Sort key: backends in the order the run took them (its settings)."""
    order = {b: i for i, b in enumerate(doc["settings"]["backends"])}
    return lambda r: order.get(r["backend"], len(order))


def _fmt(x, spec=".1f", scale=1.0):
    return "—" if x is None else format(x * scale, spec)


def markdown_table(doc: dict) -> str:
    """The run as a Markdown table: one row per backend and workload."""
    head = ["workload", "backend", "e2e median ms", "p90 ms", "× baseline", "first call s", "text", "image",
            "VAE enc", "inversion", "sampling", "region ops", "VAE dec", "peak GiB", "peak RSS GiB", "peak anon GiB",
            "sampling TFLOP/s (% of ceiling)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {n: i for i, n in enumerate(doc["settings"]["workloads"])}
    rank = _backend_rank(doc)
    for r in sorted(doc["results"], key=lambda r: (order.get(r["workload"], 99), rank(r))):
        if r.get("error"):
            lines.append(f"| {r['workload']} | {r['backend']} | failed: {r['error'][:80]} |" + " |" * (len(head) - 3))
            continue
        st = r["stages_ms"]
        tf = (r.get("tflops") or {}).get("sampling")
        unet = "—" if tf is None else f"{tf:.2f} ({100 * tf / doc['matmul_tflops']:.0f}%)"
        speed = r.get("speedup_vs_baseline")
        lines.append("| " + " | ".join([
            r["workload"], r["backend"], _fmt(r["e2e_ms_median"]), _fmt(r["e2e_ms_p90"]),
            "—" if speed is None else f"{speed:.2f}×", _fmt(r["first_call_ms"], ".1f", 1e-3),
            *(_fmt(st.get(s)) for s in ("text_encode", "image_encode", "vae_encode", "inversion", "sampling",
                                        "region_ops", "vae_decode")),
            _fmt(r.get("peak_mem_gb"), ".2f"), _fmt(r.get("peak_rss_gb"), ".1f"), _fmt(r.get("peak_anon_gb"), ".1f"), unet]) + " |")
    return "\n".join(lines)


# Stacked segments of the chart: (label, value from a result row).
_SEGMENTS = (
    ("text encode", lambda r: r["stages_ms"].get("text_encode", 0.0)),
    ("image encode", lambda r: r["stages_ms"].get("image_encode", 0.0)),
    ("VAE encode", lambda r: r["stages_ms"].get("vae_encode", 0.0)),
    ("inversion", lambda r: r["stages_ms"].get("inversion", 0.0)),
    ("sampling (networks)", lambda r: max(0.0, r["stages_ms"].get("sampling", 0.0) - r["stages_ms"].get("region_ops", 0.0))),
    ("region ops", lambda r: r["stages_ms"].get("region_ops", 0.0)),
    ("VAE decode", lambda r: r["stages_ms"].get("vae_decode", 0.0)),
)


def write_chart(doc: dict, path: Path) -> bool:
    """Stacked per-stage bars per backend, one panel per workload; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in doc["results"] if not r.get("error")]
    workloads = [w for w in doc["settings"]["workloads"] if any(r["workload"] == w for r in rows)]
    if not workloads:
        return False
    nb = max(sum(r["workload"] == w for r in rows) for w in workloads)
    fig, axes = plt.subplots(len(workloads), 1, figsize=(10, 1.0 + len(workloads) * (0.45 * nb + 0.8)), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, w in zip(axes[:, 0], workloads):
        mine = sorted((r for r in rows if r["workload"] == w),
                      key=_backend_rank(doc))
        for i, r in enumerate(mine):
            left = 0.0
            for k, (label, get) in enumerate(_SEGMENTS):
                v = get(r)
                ax.barh(i, v, left=left, color=colors[k], label=label if i == 0 else None)
                left += v
            other = max(0.0, r["e2e_ms_median"] - left)
            ax.barh(i, other, left=left, color="lightgray", label="other" if i == 0 else None)
            ax.text(r["e2e_ms_median"], i, f" {r['e2e_ms_median']:.0f} ms", va="center", fontsize=8)
        ax.set_xlim(0, 1.15 * max(r["e2e_ms_median"] for r in mine))  # room for the labels
        ax.set_yticks(range(len(mine)), [r["backend"] for r in mine])
        ax.invert_yaxis()
        ax.set_title(w, fontsize=10, loc="left")
        ax.set_xlabel("ms (median)")
    axes[0, 0].legend(ncol=4, fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.05))
    fig.suptitle(f"{doc['device']} · {doc['model']} ({doc['weights']} weights) · {doc['dtype']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
