"""Preview grids: the references, the base and LoRA renders and the target side by side, labelled, with a title.

Up to three references sit in the row beside the renders at the renders' size; more (Qwen-Image-2.1 takes ten)
go in a strip of thumbnails above that row, as wide as the row, so a grid of ten references stays as wide as a
grid of none and every cell stays readable.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

LABEL_HEIGHT = 14  # pixels of the caption strip above each grid cell
INLINE_REFERENCES = 3  # references beside the renders; more go in the thumbnail strip
_BACKGROUND = (32, 32, 32)
_LABEL_COLOUR = (235, 235, 235)


def _title_lines(title: str, width: int) -> list[str]:
    """``title`` broken at its " · " separators into lines that fit ``width`` pixels (a narrow grid's title wraps
    instead of being cut off)."""
    font = ImageFont.load_default()
    lines: list[str] = []
    for part in title.split(" · "):
        joined = f"{lines[-1]} · {part}" if lines else part
        if lines and font.getlength(joined) <= width:
            lines[-1] = joined
        else:
            lines.append(part)
    return lines


def _paste_row(
    grid: Image.Image, cells: Sequence[Image.Image], labels: Sequence[str], size: tuple[int, int], top: int
) -> None:
    """Cells of ``size`` (W, H) left to right at height ``top``: a label strip, then each image fitted inside."""
    W, H = size
    draw = ImageDraw.Draw(grid)
    for i, (img, label) in enumerate(zip(cells, labels, strict=True)):
        fitted = ImageOps.contain(img.convert("RGB"), (W, H), Image.Resampling.LANCZOS)
        grid.paste(fitted, (i * W + (W - fitted.width) // 2, top + LABEL_HEIGHT + (H - fitted.height) // 2))
        draw.text((i * W + 2, top + 1), label, fill=_LABEL_COLOUR)


def compose_grid(
    cells: Sequence[Image.Image],
    labels: Sequence[str],
    cell_size: tuple[int, int],
    title: str = "",
    thumbnails: int = 0,
) -> Image.Image:
    """One row of cells of ``cell_size`` (W, H), each image fitted inside keeping its aspect ratio, with a label
    strip of ``LABEL_HEIGHT`` above, and ``title`` (step, sample, PSNRs) on strips above the row, wrapped to fit.

    ``thumbnails``: the first cells are references; more than ``INLINE_REFERENCES`` of them go in one strip of
    equal cells above the row, together as wide as the row."""
    if len(labels) != len(cells):
        raise ValueError(f"{len(cells)} grid cells but {len(labels)} labels")
    W, H = cell_size
    strip = thumbnails if thumbnails > INLINE_REFERENCES else 0
    row, row_labels = cells[strip:], labels[strip:]
    width = W * len(row)
    lines = _title_lines(title, width - 4) if title else []
    top = LABEL_HEIGHT * len(lines)
    tw = width // strip if strip else 0
    th = max(1, H * tw // W) if strip else 0
    strip_height = LABEL_HEIGHT + th if strip else 0
    grid = Image.new("RGB", (width, top + strip_height + H + LABEL_HEIGHT), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for n, line in enumerate(lines):
        draw.text((2, 1 + n * LABEL_HEIGHT), line, fill=_LABEL_COLOUR)
    if strip:
        _paste_row(grid, cells[:strip], labels[:strip], (tw, th), top)
    _paste_row(grid, row, row_labels, (W, H), top + strip_height)
    return grid


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
