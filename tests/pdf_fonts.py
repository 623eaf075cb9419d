"""Text sizes in a one-page PDF figure (as matplotlib writes them), for the tests that check print sizes.

A text's size is the font size of its ``Tf`` operator times the scale of the text matrix (``Tm``) and of the
current transformation (``cm``, saved and restored by ``q``/``Q``) when it is shown (``Tj``/``TJ``). Superscripts
of mathtext are shown at their own smaller size, so they count too. Enough of PDF for matplotlib's output, not a
general parser.
"""
from __future__ import annotations

import re
import zlib
from pathlib import Path

_NUM = rb"[-+]?(?:\d+\.?\d*|\.\d+)"
_TOKEN = re.compile(rb"\((?:\\.|[^\\)])*\)|(" + _NUM + rb")|/[^\s/\[\]()<>]+|\b(Tf|Tm|Tj|TJ|cm|q|Q)\b")
_MEDIABOX = re.compile(rb"/MediaBox\s*\[\s*(" + _NUM + rb")\s+(" + _NUM + rb")\s+(" + _NUM + rb")\s+(" + _NUM + rb")")


def _streams(data: bytes):
    for m in re.finditer(rb"<<(.*?)>>\s*stream\r?\n", data, re.S):
        raw = data[m.end():data.index(b"endstream", m.end())]
        yield zlib.decompressobj().decompress(raw) if b"FlateDecode" in m.group(1) else raw


def _scale(six: list[float]) -> float:
    a, b, c, d = six[:4]
    return abs(a * d - b * c) ** 0.5


def page_width(path: Path) -> float:
    """Width of the (first) page in points."""
    box = _MEDIABOX.search(Path(path).read_bytes())
    if box is None:
        raise ValueError(f"{path}: no /MediaBox, not a PDF page")
    return float(box.group(3)) - float(box.group(1))


def text_sizes(path: Path) -> list[float]:
    """Size in points of every text shown on the page, in the PDF's own units (before any scaling on print)."""
    sizes: list[float] = []
    for stream in _streams(Path(path).read_bytes()):
        nums: list[float] = []
        font, text_matrix, ctm = None, 1.0, [1.0]
        for m in _TOKEN.finditer(stream):
            if m.group(1):
                nums.append(float(m.group(1)))
                continue
            op = m.group(2)
            if op == b"Tf":
                font = nums[-1]
            elif op == b"Tm":
                text_matrix = _scale(nums[-6:])
            elif op == b"cm":
                ctm[-1] *= _scale(nums[-6:])
            elif op == b"q":
                ctm.append(ctm[-1])
            elif op == b"Q" and len(ctm) > 1:
                ctm.pop()
            elif op in (b"Tj", b"TJ") and font is not None:
                sizes.append(font * text_matrix * ctm[-1])
            if op is not None:
                nums = []
    return sizes
