"""Layout checks for matplotlib figures, on the rendered extents: no two texts
overlap, and no legend sits on the data."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.text import Text
from matplotlib.transforms import Bbox


def _texts(fig: Figure) -> list[tuple[Text, Bbox]]:
    renderer = fig.canvas.get_renderer()
    # Tick labels exist for ticks outside the view too; only drawn ticks count
    # (Axis._update_ticks is what Axis.draw uses to choose them).
    ticks, drawn = set(), set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                ticks |= {id(tick.label1), id(tick.label2)}
            for tick in axis._update_ticks():
                drawn |= {id(tick.label1), id(tick.label2)}
    out = []
    for t in fig.findobj(Text):
        if not t.get_visible() or not t.get_text().strip():
            continue
        if id(t) in ticks and id(t) not in drawn:
            continue
        box = t.get_window_extent(renderer)
        if box.width > 0 and box.height > 0:
            out.append((t, box))
    return out


def overlapping_texts(fig: Figure, shrink: float = 1.0) -> list[tuple[str, str]]:
    """Pairs of visible texts whose rendered boxes overlap (each box shrunk by
    ``shrink`` pixels a side: touching glyph boxes do not count)."""
    fig.canvas.draw()
    boxes = [(t.get_text(), Bbox.from_extents(b.x0 + shrink, b.y0 + shrink,
                                              b.x1 - shrink, b.y1 - shrink))
             for t, b in _texts(fig)]
    return [(a, c) for i, (a, p) in enumerate(boxes) for c, q in boxes[i + 1:]
            if p.overlaps(q)]


def legend_on_data(fig: Figure) -> list[str]:
    """Legends (inside an axes) that cover any drawn data point of that axes."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bad = []
    for ax in fig.axes:
        legend = ax.get_legend()
        if not isinstance(legend, Legend) or not legend.get_visible():
            continue
        box = legend.get_window_extent(renderer)
        points = [line.get_transform().transform(np.column_stack(line.get_data()).astype(float))
                  for line in ax.get_lines() if len(line.get_xdata())]
        points += [c.get_offset_transform().transform(c.get_offsets())
                   for c in ax.collections if len(c.get_offsets())]
        xy = np.vstack(points) if points else np.empty((0, 2))
        xy = xy[np.isfinite(xy).all(axis=1)]
        inside = ((xy[:, 0] > box.x0) & (xy[:, 0] < box.x1) & (xy[:, 1] > box.y0)
                  & (xy[:, 1] < box.y1))
        if inside.any():
            bad.append(f"{ax.get_title() or 'axes'}: legend covers {int(inside.sum())} points")
    return bad
