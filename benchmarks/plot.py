"""The picture of a run: one panel per kind of measurement, a bar per system at each size
(or number of holders) showing the median, whiskers from min to max; log scale where the
values span orders of magnitude.  matplotlib's Agg backend draws without a display; with
no matplotlib installed the run simply has no PNG."""

from __future__ import annotations

from typing import Any

PANELS = {
    "put": ("Put, one array", "GB/s (higher is better)"),
    "get-touch": ("Get + touch one element, in another process", "µs (lower is better)"),
    "get-sum": ("Get + sum(), in another process", "ms (lower is better)"),
    "small": ("1 KiB puts, one call each", "objects/s (higher is better)"),
    "memory": ("Memory added per holder of one variable", "MiB (lower is better)"),
    "defragment": ("Defragment vs memmove of the same bytes", "GB/s (higher is better)"),
}
LOG_SPAN = 30  # max/min above this: log scale
COLORS = {"fabric": "tab:blue", "limit": "tab:gray", "dask": "tab:red", "ray": "tab:green", "vineyard": "tab:purple"}
HATCHES = ["", "//", "..", "xx"]  # a system's second, third... series in a panel


def _unique(values: list) -> list:
    return list(dict.fromkeys(values))


def figure(rows: list[dict]) -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(19, 12))
    panels = [p for p in PANELS if any(r["panel"] == p for r in rows)]
    for ax, panel in zip(axes.flat, panels, strict=False):
        _draw(ax, panel, [r for r in rows if r["panel"] == panel])
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _draw(ax: Any, panel: str, rows: list[dict]) -> None:
    title, ylabel = PANELS[panel]
    categories, series = _unique([r["category"] for r in rows]), _unique([r["series"] for r in rows])
    positive = [v for r in rows for v in (r["min"], r["max"]) if v > 0]
    log = bool(positive) and max(positive) / min(positive) > LOG_SPAN
    floor = min(positive) / 3 if log else 0.0  # a log axis cannot show zero or less: such bars stop here
    width = 0.8 / len(series)
    seen: dict[str, int] = {}
    for j, name in enumerate(series):
        mine = [r for r in rows if r["series"] == name]
        system = mine[0]["system"]
        variant = seen[system] = seen.get(system, -1) + 1
        xs = [categories.index(r["category"]) + (j - (len(series) - 1) / 2) * width for r in mine]
        ys = [max(r["median"], floor) for r in mine]
        low = [y - max(r["min"], floor) for y, r in zip(ys, mine, strict=True)]
        high = [max(r["max"], floor) - y for y, r in zip(ys, mine, strict=True)]
        style = {"color": COLORS[system], "hatch": HATCHES[variant % len(HATCHES)], "edgecolor": "white"}
        ax.bar(xs, ys, width, yerr=[low, high], capsize=2, label=name, **style)
        for x, r in zip(xs, mine, strict=True):
            if r["median"] <= floor:
                ax.annotate(f"{r['median']:.2g}", (x, floor), ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(categories)), categories, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.07))  # below: no bar hidden
    ax.grid(axis="y", alpha=0.3)
