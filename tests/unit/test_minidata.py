"""lavender_checks.synthetic.minidata: the synthetic mini benchmarks in fixtures/lmudata-mini."""

from __future__ import annotations

import argparse
import ast
import re
import tomllib
import warnings

import numpy as np
import pandas as pd
import pytest

from lavender_checks import FIXTURES, data
from lavender_checks.benchmarks import get_benchmark
from lavender_checks.synthetic import minidata

MINI = FIXTURES / "lmudata-mini"
NAMES = ["DocVQA_VAL", "ChartQA_TEST", "MMBench_DEV_EN", "MME"]
MME_SUBTASKS = ["existence", "count", "position", "color", "posters", "celebrity", "scene",
                "landmark", "artwork", "OCR", "commonsense_reasoning", "numerical_calculation",
                "text_translation", "code_reasoning"]
L2_CATEGORIES = {"coarse_perception", "finegrained_perception (instance-level)",
                 "finegrained_perception (cross-instance)", "attribute_reasoning",
                 "relation_reasoning", "logic_reasoning"}
# Plain English words, numbers and a little punctuation: what the tiny tokenizer knows.
PLAIN_ANSWER = re.compile(r"[A-Za-z0-9 .,:/$%+-]+")


@pytest.fixture(autouse=True)
def _private_md5_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini")
    return out, minidata.build_mini_lmudata(out)


def raw(name: str) -> pd.DataFrame:
    """The committed TSV as pandas reads it, before VLMEvalKit's reference resolution."""
    return pd.read_csv(MINI / get_benchmark(name).spec.tsv, sep="\t")


def committed_manifest() -> dict:
    with (MINI / minidata.MANIFEST).open("rb") as fh:
        return tomllib.load(fh)


# ---------------------------------------------------------------------------- determinism


def test_rebuild_gives_the_committed_bytes(rebuilt):
    out, written = rebuilt
    manifest = committed_manifest()
    same_build = manifest["built_with"] == minidata.built_with()
    for name, path in written.items():
        committed = MINI / path.name
        if same_build:
            assert path.read_bytes() == committed.read_bytes(), f"{name}: not the committed bytes"
        else:
            # Another Pillow build draws and compresses differently; the text must still agree.
            ours, theirs = pd.read_csv(path, sep="\t"), pd.read_csv(committed, sep="\t")
            pd.testing.assert_frame_equal(ours.drop(columns="image"), theirs.drop(columns="image"))
    if same_build:
        assert (out / minidata.MANIFEST).read_bytes() == (MINI / minidata.MANIFEST).read_bytes()
    else:
        pytest.skip(f"image bytes not compared: committed with {manifest['built_with']}, "
                    f"this machine has {minidata.built_with()}")


def test_two_builds_are_identical(rebuilt, tmp_path):
    _, first = rebuilt
    second = minidata.build_mini_lmudata(tmp_path)
    for name, path in first.items():
        assert path.read_bytes() == second[name].read_bytes()


def test_manifest_matches_the_files():
    manifest = committed_manifest()
    assert manifest["synthetic"] is True
    for name in NAMES:
        entry = manifest["files"][name]
        path = MINI / entry["tsv"]
        assert data.file_md5(path) == entry["md5"]
        assert len(pd.read_csv(path, sep="\t")) == entry["rows"]


def test_all_four_are_small():
    assert sum((MINI / get_benchmark(n).spec.tsv).stat().st_size for n in NAMES) < 2_000_000


# ---------------------------------------------------------------- loadable as VLMEvalKit's


@pytest.mark.parametrize("name", NAMES)
def test_mini_tsv_passes_load_benchmark(name):
    benchmark = get_benchmark(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = data.load_benchmark(benchmark, MINI)
    frame = loaded.frame
    assert list(frame.columns[:1]) == ["index"]
    assert pd.api.types.is_integer_dtype(frame["index"])
    assert set(benchmark.spec.required_columns) <= set(frame.columns)
    info = data.provenance(loaded)
    assert info["synthetic"] and not info["comparable"] and info["rows_without_image"] == 0
    for index in frame["index"]:
        image = data.load_image(loaded, index, benchmark)
        assert 200 <= max(image.size) <= 500


# ----------------------------------------------------------------------------- contents


def test_docvqa_pages_questions_and_list_answers():
    frame = raw("DocVQA_VAL")
    assert list(frame.columns) == ["index", "image", "question", "answer"]
    assert 20 <= len(frame) <= 30
    assert frame["image"].str.len().gt(64).all()  # every row holds its own base64
    assert 6 <= frame["image"].nunique() <= 10 and frame.groupby("image").size().ge(2).all()
    for cell in frame["answer"]:
        answers = ast.literal_eval(cell)
        assert isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)
        assert all(PLAIN_ANSWER.fullmatch(a) for a in answers)
    loaded = data.load_benchmark_frame("DocVQA_VAL", MINI)
    modes = {data.load_image(loaded, i).mode for i in loaded["index"]}
    assert modes == {"L", "RGB"}  # grayscale scans are kept grayscale


def test_chartqa_splits_and_scalar_answers():
    frame = raw("ChartQA_TEST")
    assert list(frame.columns) == ["index", "image", "question", "answer", "split"]
    assert frame["split"].value_counts().to_dict() == {"test_human": 12, "test_augmented": 12}
    answers = frame["answer"].astype(str)
    assert answers.map(lambda a: PLAIN_ANSWER.fullmatch(a) is not None).all()
    numeric = pd.to_numeric(answers, errors="coerce").notna()
    assert numeric.any() and (~numeric).any()  # numbers and words


def test_mmbench_layout_categories_and_options():
    frame = raw("MMBench_DEV_EN")
    assert list(frame.columns) == ["index", "question", "hint", "A", "B", "C", "D", "answer",
                                   "category", "image", "l2-category", "split"]
    mains = frame[frame["index"] < 1_000_000]
    assert len(mains) == 20
    assert set(mains["l2-category"]) == L2_CATEGORIES
    assert mains["category"].nunique() == 20
    assert set(frame["split"]) == {"dev"}
    assert mains["hint"].isna().any() and mains["hint"].notna().any()
    counts = {len(_options(row)) for _, row in mains.iterrows()}
    assert counts == {2, 3, 4}
    # The option "None" is read as NaN, so that question is left with three options.
    assert mains.loc[mains["question"] == "What color is the square?", "D"].isna().all()
    assert (frame["answer"].isin(list("ABCD"))).all()


def _options(row) -> dict[str, str]:
    return {letter: row[letter] for letter in "ABCD" if not pd.isna(row[letter])}


def test_mmbench_circular_copies_rotate_options_and_answer():
    frame = raw("MMBench_DEV_EN")
    mains = frame[frame["index"] < 1_000_000].set_index("index")
    copies = frame[frame["index"] >= 1_000_000]
    with open(minidata.CONTENT, "rb") as fh:
        content = tomllib.load(fh)["mmbench"]["questions"]
    expected_copies = sum(len(q["options"]) - 1 for q in content)
    assert len(copies) == expected_copies
    for _, copy in copies.iterrows():
        main_index, k = copy["index"] % 1_000_000, copy["index"] // 1_000_000
        main = mains.loc[main_index]
        texts = [str(t) for t in content[main_index]["options"]]
        n = len(texts)
        assert 1 <= k < n
        assert copy["image"] == str(main_index)  # a reference to the main row's image
        for j in range(n):
            cell = copy["ABCD"[j]]
            assert (pd.isna(cell) and texts[(j + k) % n] == "None") or cell == texts[(j + k) % n]
        correct_text = main[main["answer"]]
        assert copy[copy["answer"]] == correct_text
        assert copy["question"] == main["question"] and copy["category"] == main["category"]
    # Every letter of a 4-option question is the answer in one of its rotations.
    four = [i for i, q in enumerate(content) if len(q["options"]) == 4]
    for main_index in four:
        group = frame[frame["index"] % 1_000_000 == main_index]
        assert sorted(group["answer"]) == list("ABCD")


def test_mme_subtasks_pairs_and_references():
    frame = raw("MME")
    assert list(frame.columns) == ["index", "image", "question", "answer", "category", "image_path"]
    assert list(pd.unique(frame["category"])) == MME_SUBTASKS
    assert frame.groupby("category")["image_path"].nunique().eq(2).all()
    assert frame.groupby("image_path").size().eq(2).all()
    assert all(sorted(answers) == ["No", "Yes"]
               for answers in frame.groupby("image_path")["answer"].apply(list))
    assert frame["question"].str.endswith(" Please answer yes or no.").all()
    paths = frame["image_path"]
    assert paths.str.match(r"^[A-Za-z_]+/\d{4}\.(jpg|png)$").all()
    assert paths.str.endswith(".jpg").any() and paths.str.endswith(".png").any()
    assert (paths.str.split("/").str[0] == frame["category"]).all()
    for _, pair in frame.groupby("image_path", sort=False):
        first, second = pair.iloc[0], pair.iloc[1]
        assert len(first["image"]) > 64 and second["image"] == str(first["index"])


def test_mme_jpg_images_are_jpeg_re_encoded_and_png_ones_are_not():
    frame = data.load_benchmark_frame("MME", MINI)
    jpg = frame[frame["image_path"].str.endswith(".jpg")].iloc[0]
    png = frame[frame["image_path"].str.endswith(".png")].iloc[0]
    assert data.load_image(frame, jpg["index"]).format == "JPEG"
    png_image = data.load_image(frame, png["index"])
    assert png_image.format in (None, "PNG")


# ---------------------------------------------------------------------------------- command


def test_make_mini_data_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    minidata.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "out")])
    assert minidata.main(args) == 0
    for name in NAMES:
        assert (tmp_path / "out" / get_benchmark(name).spec.tsv).is_file()
    assert (tmp_path / "out" / minidata.MANIFEST).is_file()
    assert "MME.tsv" in capsys.readouterr().out
    assert parser.parse_args([]).out is None  # default: fixtures/lmudata-mini


def test_rebuilt_copy_is_recognised_as_synthetic(rebuilt):
    out, _ = rebuilt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = data.load_benchmark("ChartQA_TEST", out)
    assert data.provenance(frame)["synthetic"] is True
    first = np.asarray(data.load_image(frame, 0))
    assert first.ndim == 3 and first.shape[2] == 3  # the RGBA chart becomes RGB
