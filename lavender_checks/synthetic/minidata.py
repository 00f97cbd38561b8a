"""Synthetic mini benchmarks in VLMEvalKit's TSV format (``fixtures/lmudata-mini``).

``build_mini_lmudata`` renders ``fixtures/lmudata-mini/content.toml`` (documents, charts and
scenes with their questions) into ``DocVQA_VAL.tsv``, ``ChartQA_TEST.tsv``,
``MMBench_DEV_EN.tsv`` and ``MME.tsv``, laid out as VLMEvalKit's files are: base64 images,
reference cells, MMBench circular copies, MME's image_path and question suffix. It also writes
``synthetic.toml``, the manifest by which ``data.load_benchmark`` knows these files are
synthetic (their scores are never comparable with a report).

The output is byte-for-byte deterministic for a given Pillow build (fonts, zlib and libjpeg
decide the image bytes; the manifest records their versions): no randomness, no timestamps,
no PNG text chunks.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import math
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageDraw, ImageFilter, ImageFont, features

from lavender_checks import FIXTURES

DEFAULT_OUT = FIXTURES / "lmudata-mini"
CONTENT = DEFAULT_OUT / "content.toml"
MANIFEST = "synthetic.toml"  # the name data.load_benchmark looks for
BENCHMARK_SECTIONS = {"DocVQA_VAL": "docvqa", "ChartQA_TEST": "chartqa",
                      "MMBench_DEV_EN": "mmbench", "MME": "mme"}
LETTERS = "ABCD"
CIRCULAR_OFFSET = 1_000_000  # MMBench: copy k of main row i has index i + k * 1e6


# ---------------------------------------------------------------------------------- drawing


@cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled font: no system font, so the same pixels on every machine with the
    # same Pillow build.
    return ImageFont.load_default(size=size)


def _xy(values) -> list[tuple[int, int]]:
    return [tuple(p) for p in values]


def _draw_items(canvas: Image.Image, items: list[dict]) -> Image.Image:
    draw = ImageDraw.Draw(canvas)
    for item in items:
        if "blur" in item:
            canvas = canvas.filter(ImageFilter.GaussianBlur(item["blur"]))
            draw = ImageDraw.Draw(canvas)
            continue
        shape = item["shape"]
        fill, outline, width = item.get("fill"), item.get("outline"), item.get("width", 1)
        if shape == "rect":
            draw.rectangle(item["box"], fill=fill, outline=outline, width=width)
        elif shape == "ellipse":
            draw.ellipse(item["box"], fill=fill, outline=outline, width=width)
        elif shape == "triangle":
            x0, y0, x1, y1 = item["box"]
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline)
        elif shape == "star":
            # Five points: outer and inner corners alternate.
            cx, cy = item["center"]
            r_out, r_in = item["radius"], item["radius"] * 0.38
            points = []
            for k in range(10):
                r = r_out if k % 2 == 0 else r_in
                angle = math.pi / 2 + k * math.pi / 5
                points.append((round(cx + r * math.cos(angle)), round(cy - r * math.sin(angle))))
            draw.polygon(points, fill=fill)
        elif shape == "polygon":
            draw.polygon(_xy(item["points"]), fill=fill, outline=outline)
        elif shape == "line":
            draw.line(_xy(item["points"]), fill=fill, width=width)
        elif shape == "arc":
            draw.arc(item["box"], item["start"], item["end"], fill=fill, width=width)
        elif shape == "pieslice":
            draw.pieslice(item["box"], item["start"], item["end"], fill=fill, outline=outline)
        elif shape == "text":
            draw.multiline_text(tuple(item["xy"]), item["text"], fill=fill,
                                font=_font(item["size"]), spacing=6)
        else:
            raise ValueError(f"unknown drawing item {shape!r} in {CONTENT.name}")
    return canvas


def _scene(size, background: str, items: list[dict]) -> Image.Image:
    return _draw_items(Image.new("RGB", tuple(size), background), items)


def _document(doc: dict, section: dict) -> Image.Image:
    width, height = doc.get("size", section["size"])
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    margin, y = 24, 20
    if doc["title"]:
        title_font = _font(section["title_size"])
        draw.text((width // 2, y), doc["title"], fill="black", font=title_font, anchor="ma")
        y += section["title_size"] + 18
    font = _font(section["text_size"])
    for line in doc["lines"]:
        if " | " in line or line.endswith(" |"):
            # A table row: cells in equal columns.
            cells = [c.strip() for c in line.split("|")]
            column = (width - 2 * margin) // len(cells)
            for k, cell in enumerate(cells):
                draw.text((margin + k * column, y), cell, fill="black", font=font)
        elif line:
            draw.text((margin, y), line, fill="black", font=font)
        y += section["line_height"]
    draw.rectangle([4, 4, width - 5, height - 5], outline="gray", width=1)
    return page


def _chart(chart: dict, section: dict) -> Image.Image:
    width, height = section["size"]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title_font, label_font = _font(section["title_size"]), _font(section["label_size"])
    draw.text((width // 2, 8), chart["title"], fill="black", font=title_font, anchor="ma")
    left, right, top, bottom = 40, width - 20, 50, height - 40
    draw.line([(left, top - 10), (left, bottom), (right, bottom)], fill="black", width=2)
    values, labels = chart["values"], chart["labels"]
    peak = max(values) * 1.15
    step = (right - left) / len(values)

    def y_of(value: float) -> int:
        return round(bottom - (bottom - top) * value / peak)

    points = []
    for k, (label, value) in enumerate(zip(labels, values)):
        centre = round(left + step * (k + 0.5))
        draw.text((centre, bottom + 6), label, fill="black", font=label_font, anchor="ma")
        shown = f"{value:g}"
        if chart["kind"] == "bar":
            half = round(step * 0.3)
            draw.rectangle([centre - half, y_of(value), centre + half, bottom - 1],
                           fill=chart["color"])
            draw.text((centre, y_of(value) - 4), shown, fill="black", font=label_font, anchor="md")
        else:
            points.append((centre, y_of(value)))
            draw.text((centre, y_of(value) - 8), shown, fill="black", font=label_font, anchor="md")
    if points:
        draw.line(points, fill=chart["color"], width=3)
        for x, y in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=chart["color"])
    return image


def _encode(image: Image.Image, mode: str, fmt: str, jpeg_quality: int) -> str:
    """The base64 cell of an image stored in ``mode`` and ``fmt``."""
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif mode != image.mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    elif fmt == "PNG":
        image.save(buffer, format="PNG")  # no text chunks, no time stamp
    else:
        raise ValueError(f"unsupported image format {fmt!r} in {CONTENT.name}")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------ benchmarks


def _docvqa(section: dict, quality: int) -> pd.DataFrame:
    rows = []
    for doc in section["documents"]:
        # Each row holds its own copy of the page, as in VLMEvalKit's DocVQA_VAL.tsv.
        cell = _encode(_document(doc, section), doc["mode"], doc["format"], quality)
        for q in doc["questions"]:
            rows.append({"image": cell, "question": q["question"],
                         "answer": repr([str(a) for a in q["answers"]])})
    return _frame(rows, section["columns"])


def _chartqa(section: dict, quality: int) -> pd.DataFrame:
    rows = []
    for chart in section["charts"]:
        cell = _encode(_chart(chart, section), chart["mode"], chart["format"], quality)
        for q in chart["questions"]:
            rows.append({"image": cell, "question": q["question"], "answer": str(q["answer"]),
                         "split": chart["split"]})
    return _frame(rows, section["columns"])


def _mmbench(section: dict, quality: int) -> pd.DataFrame:
    mains, copies = [], []
    for main_index, q in enumerate(section["questions"]):
        options = [str(o) for o in q["options"]]
        n = len(options)
        correct = LETTERS.index(q["answer"])
        if not 2 <= n <= 4 or correct >= n:
            raise ValueError(f"{CONTENT.name}: MMBench question {q['question']!r} needs 2-4 "
                             "options and an answer among them")
        image = _scene(section["size"], q.get("background", "white"), q["items"])
        base = {"question": q["question"], "hint": q["hint"] or None,
                "category": q["category"], "l2-category": q["l2_category"],
                "split": section["split"]}
        for k in range(n):
            # Copy k shows option (j + k) mod n under letter j; the answer letter follows.
            row = dict(base)
            row["index"] = main_index + k * CIRCULAR_OFFSET
            for j, letter in enumerate(LETTERS):
                row[letter] = options[(j + k) % n] if j < n else None
            row["answer"] = LETTERS[(correct - k) % n]
            if k == 0:
                row["image"] = _encode(image, section["mode"], section["format"], quality)
                mains.append(row)
            else:
                row["image"] = str(main_index)  # a reference to the main row's image
                copies.append((k, row))
    # Main questions first, then the first copies of all of them, then the second, ...
    ordered = mains + [row for _, row in sorted(copies, key=lambda kr: kr[0])]
    return pd.DataFrame(ordered, columns=section["columns"])


def _mme(section: dict, quality: int) -> pd.DataFrame:
    rows = []
    for picture in section["images"]:
        path = picture["image_path"]
        fmt = "JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG"
        image = _scene(section["size"], picture.get("background", "white"), picture["items"])
        cell = _encode(image, picture.get("mode", "RGB"), fmt, quality)
        first_index = len(rows)
        for k, q in enumerate(picture["questions"]):
            rows.append({
                "image": cell if k == 0 else str(first_index),  # second: a reference
                "question": q["question"] + section["question_suffix"],
                "answer": q["answer"], "category": picture["category"], "image_path": path,
            })
    return _frame(rows, section["columns"])


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    for index, row in enumerate(rows):
        row["index"] = index
    return pd.DataFrame(rows, columns=columns)


BUILDERS = {"docvqa": _docvqa, "chartqa": _chartqa, "mmbench": _mmbench, "mme": _mme}


# ----------------------------------------------------------------------------------- output


def write_tsv(frame: pd.DataFrame, path: Path) -> None:
    # As VLMEvalKit's TSVs are laid out: tab-separated, a header, no pandas index column,
    # empty cells for NaN, minimal quoting, "\n" line ends.
    frame.to_csv(path, sep="\t", index=False, lineterminator="\n", encoding="utf-8")


def built_with() -> dict[str, str]:
    """Versions that decide the image bytes (fonts, PNG and JPEG encoders)."""
    import PIL

    out = {"pillow": PIL.__version__}
    for feature in ("freetype2", "zlib", "zlib_ng", "libjpeg_turbo"):
        out[feature] = str(features.version(feature)) if features.check(feature) else "absent"
    return out


def _manifest_text(entries: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# Written by `lavender-checks make-mini-data`: synthetic mini benchmarks, NOT",
        "# VLMEvalKit's files. lavender_checks.data.load_benchmark_frame recognises them by md5",
        "# and marks their scores as not comparable with any report.",
        "synthetic = true",
        "",
        "[built_with]",
        *(f'{key} = "{value}"' for key, value in built_with().items()),
    ]
    for name, entry in entries.items():
        lines += ["", f"[files.{name}]", f'tsv = "{entry["tsv"]}"', f'md5 = "{entry["md5"]}"',
                  f"rows = {entry['rows']}", f"bytes = {entry['bytes']}"]
    return "\n".join(lines) + "\n"


def load_content(path: str | Path = CONTENT) -> dict:
    with Path(path).open("rb") as fh:
        return tomllib.load(fh)


def build_mini_lmudata(out_dir: str | Path | None = None, content: str | Path = CONTENT
                       ) -> dict[str, Path]:
    """Write the four mini TSVs and ``synthetic.toml`` into ``out_dir`` (default
    ``fixtures/lmudata-mini``); return {benchmark name: TSV path}."""
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    spec = load_content(content)
    written: dict[str, Path] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, key in BENCHMARK_SECTIONS.items():
        section = spec[key]
        frame = BUILDERS[key](section, spec["jpeg_quality"])
        path = out / section["tsv"]
        write_tsv(frame, path)
        data = path.read_bytes()
        written[name] = path
        entries[name] = {"tsv": section["tsv"], "md5": hashlib.md5(data).hexdigest(),
                         "rows": len(frame), "bytes": len(data)}
    (out / MANIFEST).write_text(_manifest_text(entries), encoding="utf-8")
    return written


# --------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help=f"folder to write the TSVs to (default: {DEFAULT_OUT})")


def main(args: argparse.Namespace) -> int:
    written = build_mini_lmudata(args.out)
    for name, path in written.items():
        print(f"{name:16s} {path}  ({path.stat().st_size / 1024:.0f} KiB)")
    print(f"manifest         {path.parent / MANIFEST}")
    return 0
