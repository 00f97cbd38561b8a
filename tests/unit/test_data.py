"""lavender_checks.data: LMUData folder, TSV reading and checks, images, subsets and shards."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lavender_checks import FIXTURES, data
from lavender_checks.benchmarks import get_benchmark
from lavender_checks.data import md5 as data_md5
from lavender_checks.data import tsv as data_tsv

MINI = FIXTURES / "lmudata-mini"
NAMES = ["DocVQA_VAL", "ChartQA_TEST", "MMBench_DEV_EN", "MME"]


@pytest.fixture(autouse=True)
def _private_md5_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))


def spec_of(name: str):
    return get_benchmark(name).spec


def b64(image: Image.Image, fmt: str = "PNG", **params) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def picture(mode: str = "RGB", size=(48, 32)) -> Image.Image:
    """A picture with detail (a gradient and a square), so JPEG changes its pixels."""
    ramp = np.add.outer(np.arange(size[1]) * 5, np.arange(size[0]) * 3).astype(np.uint8)
    rgb = Image.fromarray(np.stack([ramp, ramp[::-1], 255 - ramp], axis=-1), "RGB")
    rgb.paste((250, 10, 10), (10, 8, 22, 20))
    if mode == "RGB":
        return rgb
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray((ramp // 2).astype(np.uint8), "L"))
        return rgba
    return rgb.convert(mode)


def write_tsv(folder: Path, name: str, frame: pd.DataFrame) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    frame.to_csv(path, sep="\t", index=False, lineterminator="\n")
    return path


def vqa_spec(path: Path | None = None, **changes):
    """DocVQA's spec, pointed at a test file: its md5 and row count when ``path`` is given."""
    spec = spec_of("DocVQA_VAL")
    if path is not None:
        changes.setdefault("md5", hashlib.md5(path.read_bytes()).hexdigest())
        changes.setdefault("rows", len(pd.read_csv(path, sep="\t")))
    return dataclasses.replace(spec, **changes)


def vqa_frame(images: list[str], indices=None, **extra) -> pd.DataFrame:
    indices = list(range(len(images))) if indices is None else indices
    frame = pd.DataFrame({"index": indices, "image": images,
                          "question": [f"q{i}" for i in indices],
                          "answer": ["['a']"] * len(images)})
    for column, values in extra.items():
        frame[column] = values
    return frame


def load_quietly(spec, root, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.DataMismatchWarning)
        return data.load_benchmark(spec, root, **kw)


def mini(name: str) -> pd.DataFrame:
    return data.load_benchmark_frame(name, MINI)


# ------------------------------------------------------------------------------ the folder


def test_lmudata_root_follows_vlmevalkit_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(data.LMUDATA_ENV, raising=False)
    assert data.lmudata_root() == tmp_path / "home" / "LMUData"
    monkeypatch.setenv(data.LMUDATA_ENV, str(tmp_path / "absent"))
    assert data.lmudata_root() == tmp_path / "home" / "LMUData"  # not a folder: ignored
    (tmp_path / "lmu").mkdir()
    monkeypatch.setenv(data.LMUDATA_ENV, str(tmp_path / "lmu"))
    assert data.lmudata_root() == tmp_path / "lmu"
    assert data.lmudata_root(tmp_path / "other") == tmp_path / "other"


def test_missing_root_names_every_folder_looked_at(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(data.LMUDATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(data.DataError) as err:
        data.load_benchmark_frame("DocVQA_VAL", None)
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    assert str(tmp_path / "home" / "LMUData") in message
    assert "LMUData" in message and "environment variable" in message


def test_missing_tsv_names_the_path(tmp_path):
    with pytest.raises(data.DataError) as err:
        data.load_benchmark_frame("ChartQA_TEST", tmp_path)
    assert str(tmp_path / "ChartQA_TEST.tsv") in str(err.value)
    assert "environment variable LMUData" in str(err.value)


def test_missing_column_is_named_with_the_file(tmp_path):
    path = write_tsv(tmp_path, "DocVQA_VAL.tsv",
                     vqa_frame([b64(picture())]).drop(columns=["answer"]))
    with pytest.raises(data.DataError) as err:
        load_quietly("DocVQA_VAL", tmp_path)
    assert "'answer'" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("content, expected", [
    (b"index\timage\tquestion\tanswer\n0\tx\tq\ta\n1\tx\tq\ta\textra\tcells\n", "read_csv"),
    (b"index\timage\tquestion\tanswer\n0\tx\tq\ta\textra\tcells\n", "more fields than the header"),
    (b"index\timage\tquestion\tanswer\n0\t\xff\xfe\tq\ta\n", "read_csv"),
    (b"", "read_csv"),
])
def test_unreadable_tsv_is_a_data_error(tmp_path, content, expected):
    path = tmp_path / "DocVQA_VAL.tsv"
    path.write_bytes(content)
    with pytest.raises(data.DataError) as err:
        load_quietly("DocVQA_VAL", tmp_path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_bytes_that_are_not_utf8_are_placed_by_line_and_field(tmp_path):
    path = tmp_path / "DocVQA_VAL.tsv"
    path.write_bytes(b"index\timage\tquestion\tanswer\n0\tx\tq\ta\n1\tx\tcaf\xe9\ta\n")
    with pytest.raises(data.DataError) as err:
        load_quietly("DocVQA_VAL", tmp_path)
    assert "line 3 (data row 2, field 3) holds byte 0xe9 (byte 8 of the line)" in str(err.value)


def test_a_file_cut_short_inside_its_last_row_is_refused(tmp_path):
    """pandas reads the missing fields as empty cells: the row would reach the model with
    half an image and no question."""
    path = write_tsv(tmp_path, "DocVQA_VAL.tsv", vqa_frame([b64(picture()), b64(picture())]))
    whole = path.read_bytes()
    path.write_bytes(whole[:whole.rindex(b"\t", 0, len(whole) - 1) - 40])  # inside row 2's image
    with pytest.raises(data.DataError) as err:
        load_quietly("DocVQA_VAL", tmp_path)
    assert str(err.value).startswith(f"{path}: the file ends inside data row 2, which has 2 of the "
                                     "header's 4 fields and no line end")
    # A complete last row without a line end is a whole file.
    path.write_bytes(whole.rstrip(b"\n"))
    assert len(load_quietly("DocVQA_VAL", tmp_path).frame) == 2


def test_a_header_only_tsv_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "DocVQA_VAL.tsv"
    path.write_bytes(b"index\timage\tquestion\tanswer\n")
    with pytest.raises(data.DataError) as err:
        load_quietly("DocVQA_VAL", tmp_path)
    assert str(err.value) == f"{path}: no data rows (a header only)"
    # Rows that all lack an image leave none either (VLMEvalKit drops them).
    write_tsv(tmp_path, "DocVQA_VAL.tsv", vqa_frame([None, None]))
    with pytest.raises(data.DataError, match="no data rows with an image [(]2 without one[)]"):
        load_quietly("DocVQA_VAL", tmp_path)


def test_duplicate_indices_are_named(tmp_path):
    write_tsv(tmp_path, "DocVQA_VAL.tsv", vqa_frame([b64(picture())] * 3, indices=[4, 7, 4]))
    with pytest.raises(data.DataError) as err:
        load_quietly("DocVQA_VAL", tmp_path)
    assert "index 4 in data rows 1, 3" in str(err.value)


# ------------------------------------------------------------------------------ TSV semantics


def test_pandas_na_tokens_become_nan_and_rows_without_image_are_dropped(tmp_path):
    frame = vqa_frame([b64(picture()), None, b64(picture())], A=["None", "x", "none"],
                      B=["NA", "y", "null"])
    write_tsv(tmp_path, "DocVQA_VAL.tsv", frame)
    record = load_quietly("DocVQA_VAL", tmp_path)
    loaded = record.frame
    assert loaded["index"].tolist() == [0, 2]  # the row without an image is gone
    assert pd.isna(loaded.loc[0, "A"]) and loaded.loc[1, "A"] == "none"  # 'None' is NA, 'none' not
    assert pd.isna(loaded.loc[0, "B"]) and pd.isna(loaded.loc[1, "B"])
    assert data.provenance(record)["rows_without_image"] == 1
    assert data.provenance(record)["rows_in_file"] == 3


def test_int_like_string_indices_become_int_and_others_are_refused_naming_the_file(tmp_path):
    path = write_tsv(tmp_path, "DocVQA_VAL.tsv", vqa_frame([b64(picture())] * 2, indices=["5", "x7"]))
    # VLMEvalKit would keep them as strings; the scorers need integers: refused at load.
    with pytest.raises(data.DataError, match="column 'index' holds 'x7' in data row 2, not an integer") as err:
        load_quietly("DocVQA_VAL", tmp_path)
    assert str(path) in str(err.value)
    write_tsv(tmp_path, "DocVQA_VAL.tsv", vqa_frame([b64(picture())] * 2, indices=[5, 12]))
    loaded = load_quietly("DocVQA_VAL", tmp_path).frame
    assert loaded["index"].tolist() == [5, 12]
    assert pd.api.types.is_integer_dtype(loaded["index"])


# ------------------------------------------------------------------------ identity checks


def test_reference_file_loads_without_warning_and_is_comparable(tmp_path):
    path = write_tsv(tmp_path, "DocVQA_VAL.tsv", vqa_frame([b64(picture())] * 2))
    spec = vqa_spec(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = data.load_benchmark(spec, tmp_path, strict=True)
    frame, record = loaded
    assert isinstance(record, data.Provenance) and loaded.provenance is record
    assert frame.attrs == {} and data.provenance(frame) == {}  # the frame carries no record
    info = data.provenance(loaded)
    assert info == record.describe() and "image_owner" not in info
    assert info["md5"] == spec.md5 and info["md5_matches"] and info["comparable"]
    assert info["tsv"] == str(path) and info["rows_match"] is True and not info["synthetic"]
    assert record.tsv_md5 == spec.md5 and record.root == str(tmp_path)


def test_md5_mismatch_warns_loudly_and_strict_raises(tmp_path):
    path = write_tsv(tmp_path, "DocVQA_VAL.tsv", vqa_frame([b64(picture())] * 2))
    spec = vqa_spec(path, md5="0" * 32, rows=5)
    with pytest.warns(data.DataMismatchWarning) as record:
        frame = data.load_benchmark(spec, tmp_path)
    message = str(record[0].message)
    assert "NOT comparable" in message and "0" * 32 in message and str(path) in message
    assert "2 rows" in message and "5" in message
    assert data.provenance(frame)["comparable"] is False
    with pytest.raises(data.DataMismatchError, match="NOT comparable"):
        data.load_benchmark_frame(spec, tmp_path, strict=True)


def test_right_md5_with_wrong_row_count_blames_benchmarks_toml(tmp_path):
    path = write_tsv(tmp_path, "DocVQA_VAL.tsv", vqa_frame([b64(picture())] * 2))
    spec = vqa_spec(path, rows=3)
    with pytest.warns(data.DataMismatchWarning, match="benchmarks.toml"):
        frame = data.load_benchmark(spec, tmp_path, strict=True)
    assert data.provenance(frame)["comparable"] is True


def test_mini_data_is_known_synthetic_quietly_but_refused_by_strict():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = data.load_benchmark("MME", MINI)
    info = data.provenance(frame)
    assert info["synthetic"] is True and info["comparable"] is False
    assert info["md5_matches"] is False
    with pytest.raises(data.DataMismatchError, match="synthetic"):
        data.load_benchmark_frame("MME", MINI, strict=True)


def test_md5_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(data_md5, "MD5_CACHE_MIN_BYTES", 0)  # file_md5 reads it there
    path = tmp_path / "f.tsv"
    path.write_bytes(b"abc")
    assert data.file_md5(path) == hashlib.md5(b"abc").hexdigest()
    cache = data.md5_cache_path()
    assert cache == tmp_path / "cache" / "md5.json"
    stored = json.loads(cache.read_text())
    entry = stored["files"][str(path.resolve())]
    assert entry["md5"] == hashlib.md5(b"abc").hexdigest()
    # Same size and mtime: the cached value is used (proved by planting another one).
    entry["md5"] = "planted"
    cache.write_text(json.dumps(stored))
    assert data.file_md5(path) == "planted"
    # Another size: hashed again.
    path.write_bytes(b"abcd")
    assert data.file_md5(path) == hashlib.md5(b"abcd").hexdigest()
    # A damaged cache costs only time.
    cache.write_text("{not json")
    assert data.file_md5(path) == hashlib.md5(b"abcd").hexdigest()


# ----------------------------------------------------------------------------------- images


def test_broken_base64_names_file_row_and_column(tmp_path):
    not_an_image = base64.b64encode(b"this is no picture at all" * 4).decode()
    bad_padding = "A" * 65
    path = write_tsv(tmp_path, "DocVQA_VAL.tsv",
                     vqa_frame([b64(picture()), not_an_image, bad_padding], indices=[3, 8, 9]))
    frame = load_quietly("DocVQA_VAL", tmp_path)
    for index, reason in ((8, "no image PIL can open"), (9, "invalid base64")):
        with pytest.raises(data.DataError) as err:
            data.load_image(frame, index, "DocVQA_VAL")
        message = str(err.value)
        assert str(path) in message and f"index {index}" in message and "column 'image'" in message
        assert reason in message
    assert data.load_image(frame, 3, "DocVQA_VAL").size == (48, 32)


def test_reference_to_missing_index_is_named(tmp_path):
    path = write_tsv(tmp_path, "DocVQA_VAL.tsv", vqa_frame([b64(picture()), "77"], indices=[1, 2]))
    with pytest.raises(data.DataError) as err:
        load_quietly("DocVQA_VAL", tmp_path)
    message = str(err.value)
    assert str(path) in message and "index 2" in message and "column 'image'" in message
    assert "'77'" in message


def test_reference_to_a_reference_is_refused(tmp_path):
    write_tsv(tmp_path, "DocVQA_VAL.tsv", vqa_frame([b64(picture()), "1", "2"], indices=[1, 2, 3]))
    with pytest.raises(data.DataError, match="again a reference"):
        load_quietly("DocVQA_VAL", tmp_path)


def test_references_resolve_to_the_same_pixels_and_key(tmp_path):
    write_tsv(tmp_path, "DocVQA_VAL.tsv", vqa_frame([b64(picture()), "10"], indices=[10, 1000010]))
    frame = load_quietly("DocVQA_VAL", tmp_path)
    assert len(frame.frame.loc[1, "image"]) > 64  # VLMEvalKit's image_map: the cell now holds base64
    same = data.load_image(frame, 1000010, "DocVQA_VAL")
    assert np.array_equal(np.asarray(same), np.asarray(data.load_image(frame, 10, "DocVQA_VAL")))
    assert data.image_key(frame, 1000010) == data.image_key(frame, 10) == "10.png"
    # A row (dict or Series) is accepted in place of its index.
    assert data.image_key(frame, frame.frame.iloc[1]) == "10.png"


def test_reference_left_in_a_hand_made_frame_is_resolved_too():
    frame = vqa_frame([b64(picture()), "4"], indices=[4, 5])
    assert np.array_equal(np.asarray(data.load_image(frame, 5)), np.asarray(picture()))
    assert data.image_key(frame, 5) == "4.png"
    with pytest.raises(data.DataError, match="no row has that index"):
        data.load_image(vqa_frame([b64(picture()), "9"], indices=[4, 5]), 5)


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA"])
def test_rgba_p_la_become_rgb(mode):
    source = picture(mode)
    frame = vqa_frame([b64(source)])
    image = data.load_image(frame, 0)
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(source.convert("RGB")))


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16"])
def test_other_modes_are_kept_and_png_round_trip_is_lossless(mode):
    source = picture("L").convert("I;16") if mode == "I;16" else picture(mode)
    image = data.load_image(vqa_frame([b64(source)]), 0)
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    explicit = Image.open(io.BytesIO(buffer.getvalue()))  # what VLMEvalKit's dump reopens
    assert image.mode == explicit.mode
    assert np.array_equal(np.asarray(image), np.asarray(explicit))
    assert np.array_equal(np.asarray(image), np.asarray(source))


def test_jpg_dump_name_means_a_quality_75_jpeg_re_encode():
    source = picture("RGB")
    frame = vqa_frame([b64(source)] * 2, image_path=["scene/0001.jpg", "scene/0002.png"])
    image = data.load_image(frame, 0)
    buffer = io.BytesIO()
    source.save(buffer, format="JPEG", quality=75)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    assert np.array_equal(np.asarray(image), expected)
    assert not np.array_equal(np.asarray(image), np.asarray(source))
    # The same base64 under a .png name is not re-encoded lossily.
    assert np.array_equal(np.asarray(data.load_image(frame, 1)), np.asarray(source))
    assert data.image_key(frame, 0) == "0.jpg" and data.image_key(frame, 1) == "1.png"


def test_jpeg_source_under_a_png_dump_keeps_the_decoded_pixels():
    encoded = b64(picture("RGB"), "JPEG", quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
    assert np.array_equal(np.asarray(data.load_image(vqa_frame([encoded]), 0)), decoded)


def test_unknown_dump_extension_is_an_error():
    frame = vqa_frame([b64(picture())], image_path=["scene/0001.xyz"])
    with pytest.raises(data.DataError, match="column 'image_path'"):
        data.load_image(frame, 0)


def test_mme_second_question_shares_the_first_ones_image():
    frame = data.load_benchmark("MME", MINI)
    first, second = frame.frame.iloc[0], frame.frame.iloc[1]
    assert first["image_path"] == second["image_path"] and first["image_path"].endswith(".jpg")
    assert data.image_key(frame, second["index"]) == f"{first['index']}.jpg"
    a, b = data.load_image(frame, first["index"]), data.load_image(frame, second["index"])
    assert np.array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------ localization


def test_big_tsv_without_local_file_gets_the_localized_jpeg(tmp_path, monkeypatch):
    monkeypatch.setattr(data_tsv, "LOCALIZE_THRESHOLD_BYTES", 10)  # load_benchmark reads it there
    source = picture("RGBA")
    write_tsv(tmp_path, "DocVQA_VAL.tsv", vqa_frame([b64(source), "3"], indices=[3, 4]))
    frame = load_quietly("DocVQA_VAL", tmp_path)
    info = data.provenance(frame)
    assert info["localized"] == "emulated"
    assert frame.frame["image_path"].tolist() == [str(tmp_path / "images" / "DocVQA_VAL" / "3.jpg")] * 2
    buffer = io.BytesIO()
    source.convert("RGB").save(buffer, format="JPEG")
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    assert np.array_equal(np.asarray(data.load_image(frame, 4)), expected)


def test_big_tsv_with_local_file_reads_it_and_opens_its_images(tmp_path, monkeypatch):
    monkeypatch.setattr(data_tsv, "LOCALIZE_THRESHOLD_BYTES", 10)  # load_benchmark reads it there
    write_tsv(tmp_path, "DocVQA_VAL.tsv", vqa_frame([b64(picture())], indices=[3]))
    folder = tmp_path / "images" / "DocVQA_VAL"
    folder.mkdir(parents=True)
    picture("L").save(folder / "3.jpg")
    local = vqa_frame([None], indices=[3]).drop(columns=["image"])
    local["image_path"] = [str(folder / "3.jpg")]
    write_tsv(tmp_path, "DocVQA_VAL_local.tsv", local)
    frame = load_quietly("DocVQA_VAL", tmp_path)
    info = data.provenance(frame)
    assert info["localized"] == "local_tsv"
    assert info["read_from"] == str(tmp_path / "DocVQA_VAL_local.tsv")
    assert info["md5"] == hashlib.md5((tmp_path / "DocVQA_VAL.tsv").read_bytes()).hexdigest()
    image = data.load_image(frame, 3, "DocVQA_VAL")
    assert image.mode == "L" and image.format == "JPEG"
    assert data.image_key(frame, 3) == str(folder / "3.jpg")


def test_small_tsv_ignores_a_local_file(tmp_path):
    write_tsv(tmp_path, "DocVQA_VAL.tsv", vqa_frame([b64(picture())]))
    write_tsv(tmp_path, "DocVQA_VAL_local.tsv", pd.DataFrame({"index": [0], "image_path": ["x"]}))
    assert data.provenance(load_quietly("DocVQA_VAL", tmp_path))["localized"] == "no"


# ------------------------------------------------------------------------ subsets and shards


def units_of(frame, name):
    return set(data.resampling_units(frame, name))


def assert_whole_units(part, full, name):
    units = data.resampling_units(full, name)
    for unit in units_of(part, name):
        assert set(part["index"][data.resampling_units(part, name) == unit]) == \
            set(full["index"][units == unit])


def test_limit_draws_units_at_random_whole_and_in_file_order():
    docvqa = mini("DocVQA_VAL")
    part = data.subset(docvqa, "DocVQA_VAL", limit=5)["index"].tolist()
    assert len(part) == 5 and part == sorted(part) and part != docvqa["index"].tolist()[:5]
    assert part == data.subset(docvqa, "DocVQA_VAL", limit=5)["index"].tolist()  # deterministic
    assert set(part) <= set(data.subset(docvqa, "DocVQA_VAL", limit=8)["index"])  # nested
    mmbench = mini("MMBench_DEV_EN")
    with pytest.warns(UserWarning, match="raised to 20"):
        part = data.subset(mmbench, "MMBench_DEV_EN", limit=3)
    assert_whole_units(part, mmbench, "MMBench_DEV_EN")
    assert set(part["index"] % 1_000_000) == set(range(20))


def test_limit_keeps_every_mme_subtask_and_both_questions():
    mme = mini("MME")
    with pytest.warns(UserWarning, match="raised to 14"):
        part = data.subset(mme, "MME", limit=1)
    assert set(part["category"]) == set(mme["category"]) and len(set(mme["category"])) == 14
    assert len(part) == 28 and part.groupby("image_path").size().eq(2).all()
    bigger = data.subset(mme, "MME", limit=20)
    assert len(units_of(bigger, "MME")) == 20 and bigger.groupby("image_path").size().eq(2).all()
    assert bigger.groupby("category")["image_path"].nunique().isin([1, 2]).all()


def test_limit_alternates_strata():
    chartqa = mini("ChartQA_TEST")
    part = data.subset(chartqa, "ChartQA_TEST", limit=6)
    assert part["split"].value_counts().to_dict() == {"test_human": 3, "test_augmented": 3}


def test_fraction_is_stratified_deterministic_and_keeps_units():
    chartqa = mini("ChartQA_TEST")
    part = data.subset(chartqa, "ChartQA_TEST", fraction=0.25, seed=1)
    assert part["split"].value_counts().to_dict() == {"test_human": 3, "test_augmented": 3}
    again = data.subset(chartqa, "ChartQA_TEST", fraction=0.25, seed=1)
    assert part["index"].tolist() == again["index"].tolist()
    seeds = {tuple(data.subset(chartqa, "ChartQA_TEST", fraction=0.25, seed=s)["index"])
             for s in range(5)}
    assert len(seeds) > 1  # the seed matters
    mmbench = mini("MMBench_DEV_EN")
    part = data.subset(mmbench, "MMBench_DEV_EN", fraction=0.1)
    assert_whole_units(part, mmbench, "MMBench_DEV_EN")
    assert set(part["category"]) == set(mmbench["category"])  # at least one unit per stratum
    assert part["index"].is_monotonic_increasing  # file order is kept


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("count", [1, 3, 7])
def test_shards_are_disjoint_cover_everything_and_keep_units(name, count):
    full = mini(name)
    shards = [data.subset(full, name, shard=(i, count)) for i in range(count)]
    indices = [set(s["index"]) for s in shards]
    assert sum(len(s) for s in indices) == len(full)
    assert set().union(*indices) == set(full["index"])
    for shard in shards:
        assert_whole_units(shard, full, name)
    assert data.subset(full, name, shard=(0, count))["index"].tolist() == \
        shards[0]["index"].tolist()


def test_shards_keep_the_questions_of_one_image_together():
    # Three questions on the page of row 0 and two on the page of row 4 (VLMEvalKit's
    # reference cells): round-robin by question would split both pages across shards.
    docvqa = mini("DocVQA_VAL").copy()
    first, fourth = (str(docvqa["index"].iloc[i]) for i in (0, 4))
    docvqa.loc[[1, 2], "image"] = first
    docvqa.loc[[5], "image"] = fourth
    for count in (2, 3):
        shards = [data.subset(docvqa, "DocVQA_VAL", shard=(i, count)) for i in range(count)]
        assert sum(len(s) for s in shards) == len(docvqa)
        owner = [next(i for i, s in enumerate(shards) if docvqa["index"].iloc[row] in set(s["index"]))
                 for row in range(len(docvqa))]
        assert owner[0] == owner[1] == owner[2] and owner[4] == owner[5]
        assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 3  # still balanced


def test_shard_and_limit_accept_lists_and_numpy_integers():
    full = mini("DocVQA_VAL")
    assert data.subset(full, "DocVQA_VAL", shard=[np.int64(1), 4])["index"].tolist() == \
        data.subset(full, "DocVQA_VAL", shard=(1, 4))["index"].tolist()
    assert len(data.subset(full, "DocVQA_VAL", limit=np.int64(4))) == 4


def test_shards_of_a_subset_cover_the_subset():
    mme = mini("MME")
    part = data.subset(mme, "MME", fraction=0.5)
    union = set().union(*(set(data.subset(mme, "MME", fraction=0.5, shard=(i, 3))["index"])
                          for i in range(3)))
    assert union == set(part["index"])


def test_subset_keeps_provenance_and_records_itself():
    full = data.load_benchmark("MMBench_DEV_EN", MINI)
    part = data.subset(full, "MMBench_DEV_EN", shard=(1, 2))
    assert isinstance(part, data.BenchmarkData) and part.frame.attrs == {}
    info = data.provenance(part)
    assert info["md5"] == data.provenance(full)["md5"]
    assert info["subsets"] == [{"limit": None, "fraction": None, "shard": [1, 2], "seed": None,
                                "units": 10, "rows": len(part.frame)}]
    assert part.provenance.tsv_md5 == full.provenance.tsv_md5
    assert part.provenance.image_owner is full.provenance.image_owner
    copy = part.frame["index"][part.frame["index"] > 1_000_000].iloc[0]
    assert data.image_key(part, copy) == f"{copy % 1_000_000}.png"
    # A bare frame has no record: its subset is a bare frame, and each row is its own image.
    bare = data.subset(full.frame, "MMBench_DEV_EN", shard=(1, 2))
    assert isinstance(bare, pd.DataFrame) and bare["index"].tolist() == part.frame["index"].tolist()
    assert data.image_key(bare, copy) == f"{copy}.png"


@pytest.mark.parametrize("kwargs", [
    {"limit": 0}, {"limit": 2.5}, {"fraction": 0}, {"fraction": 1.5}, {"limit": 2, "fraction": 0.5},
    {"shard": (2, 2)}, {"shard": (0, 0)}, {"shard": (0, 1, 2)}, {"shard": (0.0, 2)},
])
def test_subset_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        data.subset(mini("DocVQA_VAL"), "DocVQA_VAL", **kwargs)


def test_the_image_functions_take_a_benchmark_data_or_a_frame_and_nothing_else():
    loaded = data.load_benchmark("MMBench_DEV_EN", MINI)
    assert data.image_key(loaded, 1_000_000) == "0.png" and data.image_key(loaded.frame, 1_000_000) == "1000000.png"
    with pytest.raises(TypeError, match="BenchmarkData or a pandas DataFrame, not dict"):
        data.image_key({"index": [0]}, 0)


def test_dump_suffix_of_older_revisions_feeds_the_jpeg_re_encode():
    """Older VLMEvalKit revisions dumped index-named images as <index>.jpg (JPEG quality 75)."""
    import io

    from PIL import Image

    from lavender_checks import FIXTURES
    from lavender_checks.data import image_key, load_benchmark_frame, load_image

    frame = load_benchmark_frame("ChartQA_TEST", FIXTURES / "lmudata-mini")
    index = frame["index"].iloc[0]
    png = load_image(frame, index, "ChartQA_TEST")
    jpg = load_image(frame, index, "ChartQA_TEST", dump_suffix=".jpg")
    assert jpg.format == "JPEG"
    buffer = io.BytesIO()
    png.convert("RGB").save(buffer, format="JPEG")  # PIL's default quality, as save(path) does
    expected = Image.open(io.BytesIO(buffer.getvalue()))
    assert list(jpg.getdata()) == list(expected.getdata())
    assert list(jpg.getdata()) != list(png.convert("RGB").getdata())
    assert image_key(frame, index, ".jpg").endswith(".jpg")


def _mini_mme(tmp_path) -> pd.DataFrame:
    import shutil

    shutil.copy(Path(__file__).parents[2] / "fixtures" / "lmudata-mini" / "MME.tsv", tmp_path / "MME.tsv")
    return pd.read_csv(tmp_path / "MME.tsv", sep="\t", dtype=str, keep_default_na=False)


def test_an_mme_image_with_one_question_is_refused_at_load(tmp_path):
    """MME's acc+ takes two questions per image; VLMEvalKit's rating crashes on one. Found
    when the TSV is read, not by the scorer after both variants have generated."""
    frame = _mini_mme(tmp_path)
    assert len(load_quietly("MME", tmp_path).frame) == len(frame)  # the whole file loads
    lone = frame["image_path"].iloc[2]
    dropped = frame[~((frame["image_path"] == lone) & (frame.index > 2))]
    dropped.to_csv(tmp_path / "MME.tsv", sep="\t", index=False)
    with pytest.raises(data.DataError) as err:
        load_quietly("MME", tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'MME.tsv'}: column 'image_path' holds {lone!r} "
                                     f"in data row 3 (index {frame['index'].iloc[2]}) only once")


def test_an_mme_image_under_two_subtasks_is_refused_at_load(tmp_path):
    frame = _mini_mme(tmp_path)
    other = frame["category"].iloc[-1]
    assert other != frame["category"].iloc[0]
    frame.loc[1, "category"] = other  # the second question of the first image
    frame.to_csv(tmp_path / "MME.tsv", sep="\t", index=False)
    with pytest.raises(data.DataError) as err:
        load_quietly("MME", tmp_path)
    assert f"in data rows 1, 2 under categories {frame['category'].iloc[0]!r}, {other!r}" in str(err.value)
