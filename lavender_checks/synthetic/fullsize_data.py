"""Full-size synthetic benchmark frames, and base and Lavender predictions that hit given
metric values when VLMEvalKit's scorers (``benchmarks.get_benchmark(name).score``) score them.

**Frames** (``benchmark_frames``) have the four benchmarks' real sizes and structure, in the
columns of VLMEvalKit's TSVs (``fullsize_data.toml`` holds the sizes): DocVQA_VAL 5,349
questions over 1,286 pages (1 + Poisson questions per page, mean 4.16; every question of a page
holds the same image cell, as VLMEvalKit's file does); ChartQA_TEST 1,250 questions in each of
test_human and test_augmented, one chart each; MMBench_DEV_EN 1,164 circular groups in its 20
categories and 6 l2-categories, a group of n options being n rows (index and index + k·10⁶,
options rotated, copies referring to the main row's image), 4,329 rows; MME 1,187 images in its
14 subtasks, two questions each (Yes and No) sharing ``image_path``, the second referring to the
first's image. Images are small placeholders, distinct per image (nothing scores pixels).

**Predictions** (``predictions_for_targets``) are chosen per stratum (split, category, subtask)
by counting how many units must be right for a target value, then deciding which:

* DocVQA: a right answer is the answer (ANLS 1), a wrong one another question's answer whose ANLS
  is 0; a value between two whole counts takes one or two near misses (a long answer cut short,
  ANLS 0.5-1);
* ChartQA: relaxed accuracy 1 or 0 (a wrong number is off by far more than 5 %);
* MMBench: a right group answers every copy right; a wrong one either picks the same wrong
  option in every copy or answers one letter throughout;
* MME: per subtask the counts (questions right q, images with both right b) whose
  ``100·q / questions + 100·b / images`` is nearest the target, b as a positive within-pair
  correlation makes it; subtasks without a target share what perception, reasoning and total
  leave (searched so that all three print as targeted).

Which units are right: each unit has a latent ease for base, and Lavender's is
``ρ · base's + √(1 − ρ²) · noise`` (a Gaussian copula, ρ = ``latent_correlation``, 0.8); in each
stratum a model gets right the units it finds easiest. So Lavender keeps most of base's right
answers, loses some and gains others, as the count targets demand. Everything is drawn from
one seed.

**Targets** come from a reference file (``reference_targets``): each printed row's base and
Lavender number; **scenarios** (``fullsize_data.toml``) edit them (``scenario_targets``).
``write_vlmeval_folder`` writes both models' prediction files as a VLMEvalKit work dir
(``<out>/<model>/<model>_<dataset>.xlsx``) and the TSVs in ``<out>/LMUData`` with a
``synthetic.toml`` manifest (their md5 is not VLMEvalKit's: such data is never comparable).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import itertools
import math
import sys
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from lavender_checks.benchmarks import get_benchmark
from lavender_checks.text import anls_score, docvqa_answers, relaxed_accuracy

LAYOUT_FILE = Path(__file__).with_name("fullsize_data.toml")
BENCHMARKS = ("DocVQA_VAL", "ChartQA_TEST", "MMBench_DEV_EN", "MME")
VARIANTS = ("base", "lavender")
MODEL_NAMES = {"base": "llama_vision_base", "lavender": "llama_vision_lavender"}
CIRCULAR_OFFSET = 1_000_000  # MMBench: copy k of main row i has index i + k * 1e6
LETTERS = "ABCD"
LMU_FOLDER = "LMUData"
MANIFEST = "synthetic.toml"  # the name data.load_benchmark looks for
REFERENCE_MAX_CHARS = 64  # VLMEvalKit: a shorter image cell is a reference to another row
PRINT_HALF_STEP = 0.005  # a value printed with two decimals lies within this of the print


class FullsizeDataError(ValueError):
    """Targets or a scenario the maker cannot use; the message names the row or edit."""


@cache
def layout() -> dict[str, Any]:
    with LAYOUT_FILE.open("rb") as fh:
        return tomllib.load(fh)


def mmbench_l2_of() -> dict[str, str]:
    """MMBench category -> its l2-category."""
    return {c: l2 for l2, cs in layout()["MMBench_DEV_EN"]["l2_category"].items() for c in cs}


def mme_pairs() -> dict[str, int]:
    """MME subtask -> image pairs, in the order of VLMEvalKit's MME.tsv."""
    return dict(layout()["MME"]["pairs"])


# ================================================================================== frames


def _placeholder_image(benchmark: str, key: object) -> str:
    """A 4 x 4 PNG, distinct per (benchmark, key), as base64: long enough not to read as a
    reference cell."""
    pixels = hashlib.sha512(f"{benchmark}/{key}".encode()).digest()[:48]
    buffer = io.BytesIO()
    Image.frombytes("RGB", (4, 4), pixels).save(buffer, format="PNG")
    cell = base64.b64encode(buffer.getvalue()).decode("ascii")
    assert len(cell) > REFERENCE_MAX_CHARS
    return cell


_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_NAMES = ("Smith", "Johnson", "Williams", "Brown", "Garcia", "Miller", "Davis", "Wilson", "Moore",
          "Taylor", "Anderson", "Thomas", "Jackson", "White", "Harris", "Martin", "Clark", "Lewis")
_FIRST = ("John", "Mary", "Robert", "Linda", "James", "Susan", "David", "Karen", "Paul", "Helen")
_ADJECTIVES = ("National", "American", "Regional", "Scientific", "Technical", "Executive",
               "International", "Central", "Federal", "Advisory")
_NOUNS = ("Tobacco", "Research", "Nutrition", "Marketing", "Development", "Chemical", "Health",
          "Packaging", "Quality", "Finance")
_BODIES = ("Council", "Committee", "Institute", "Association", "Foundation", "Laboratories",
           "Corporation", "Board of Directors", "Working Group", "Department")


def _docvqa_answer(rng: np.random.Generator, long: bool) -> tuple[str, list[str]]:
    """(the field asked about, the answers) of one DocVQA question."""
    if long:
        words = [_ADJECTIVES[rng.integers(len(_ADJECTIVES))], _NOUNS[rng.integers(len(_NOUNS))],
                 _BODIES[rng.integers(len(_BODIES))]]
        text = " ".join(words)
        while len(text) < 24:
            text = f"{text} of {_NOUNS[rng.integers(len(_NOUNS))]}"
        return "name of the organisation in the letterhead", [text]
    kind = int(rng.integers(5))
    if kind == 0:
        return "invoice number", [str(rng.integers(100, 100000))]
    if kind == 1:
        amount = f"${rng.integers(1, 50000):,}.{rng.integers(100):02d}"
        return "total amount", [amount, amount.lstrip("$")]
    if kind == 2:
        month, day, year = int(rng.integers(12)), int(rng.integers(1, 29)), int(rng.integers(1960, 2000))
        return "date of the letter", [f"{_MONTHS[month]} {day}, {year}", f"{month + 1}/{day}/{year % 100:02d}"]
    if kind == 3:
        return "percentage given in the table", [f"{rng.integers(1, 100)}%"]
    first, last = _FIRST[rng.integers(len(_FIRST))], _NAMES[rng.integers(len(_NAMES))]
    return "name of the sender", [f"{first} {last}", f"{first[0]}. {last}"]


def docvqa_frame(rng: np.random.Generator) -> pd.DataFrame:
    """DocVQA_VAL: index, image, question, answer (a list literal); questions of a page in a
    row and holding the same image cell."""
    cfg = layout()["DocVQA_VAL"]
    pages, questions, most = cfg["pages"], cfg["questions"], cfg["questions_per_page_max"]
    per_page = np.minimum(1 + rng.poisson(questions / pages - 1, pages), most)
    while (gap := questions - int(per_page.sum())) != 0:  # even out to the exact total
        page = int(rng.integers(pages))
        if gap > 0 and per_page[page] < most:
            per_page[page] += 1
        elif gap < 0 and per_page[page] > 1:
            per_page[page] -= 1
    long = rng.random(questions) < cfg["long_answer_share"]
    rows = []
    for page, count in enumerate(per_page):
        cell = _placeholder_image("DocVQA_VAL", page)
        for _ in range(count):
            what, answers = _docvqa_answer(rng, bool(long[len(rows)]))
            rows.append({"index": len(rows), "image": cell, "question": f"What is the {what}?",
                         "answer": repr(answers)})
    return pd.DataFrame(rows, columns=["index", "image", "question", "answer"])


_COUNTRIES = ("Germany", "France", "Japan", "Brazil", "India", "Canada", "Mexico", "Italy", "Spain",
              "Kenya", "Chile", "Norway", "Egypt", "Peru", "Poland", "Turkey")


def chartqa_frame(rng: np.random.Generator) -> pd.DataFrame:
    """ChartQA_TEST: index, image, question, answer, split; one chart per question."""
    cfg = layout()["ChartQA_TEST"]
    rows = []
    for split, count in cfg["splits"].items():
        for _ in range(count):
            index = len(rows)
            if rng.random() < cfg["numeric_answer_share"]:
                value = rng.integers(1, 1000) if rng.random() < 0.5 else round(float(rng.uniform(1, 100)), 1)
                country, year = _COUNTRIES[rng.integers(len(_COUNTRIES))], int(rng.integers(2000, 2022))
                question, answer = f"What was the value for {country} in {year}?", str(value)
            else:
                question = "Which country has the highest value in the chart?"
                answer = _COUNTRIES[rng.integers(len(_COUNTRIES))]
            rows.append({"index": index, "image": _placeholder_image("ChartQA_TEST", index),
                         "question": question, "answer": answer, "split": split})
    return pd.DataFrame(rows, columns=["index", "image", "question", "answer", "split"])


def mmbench_frame(rng: np.random.Generator) -> pd.DataFrame:
    """MMBench_DEV_EN in VLMEvalKit's circular layout: main rows (groups 0..1163) first, then
    the first copies of every group, then the second, ...; copy k shows option (j + k) mod n
    under letter j and refers to the main row's image."""
    cfg = layout()["MMBench_DEV_EN"]
    categories = rng.permutation([c for c, n in cfg["groups"].items() for _ in range(n)])
    options = rng.permutation([int(k) for k, n in cfg["groups_by_options"].items() for _ in range(n)])
    if len(categories) != len(options):
        raise FullsizeDataError(f"{LAYOUT_FILE}: MMBench groups by category ({len(categories)}) and "
                                f"by option count ({len(options)}) differ")
    l2_of = mmbench_l2_of()
    copies: list[list[dict]] = [[] for _ in LETTERS]
    for group, (category, n) in enumerate(zip(categories, options)):
        texts = [f"{category.replace('_', ' ')} choice {j + 1} of question {group}" for j in range(n)]
        correct = int(rng.integers(n))
        hint = f"Context for question {group}." if rng.random() < cfg["hint_share"] else None
        for k in range(n):
            row = {"index": group + k * CIRCULAR_OFFSET,
                   "question": f"Which option fits the image of question {group} best?", "hint": hint,
                   **{letter: (texts[(j + k) % n] if j < n else None) for j, letter in enumerate(LETTERS)},
                   "answer": LETTERS[(correct - k) % n], "category": category,
                   "image": _placeholder_image("MMBench_DEV_EN", group) if k == 0 else str(group),
                   "l2-category": l2_of[category], "split": "dev"}
            copies[k].append(row)
    frame = pd.DataFrame([row for rows in copies for row in rows],
                         columns=["index", "question", "hint", *LETTERS, "answer", "category", "image",
                                  "l2-category", "split"])
    if len(frame) != cfg["rows"]:
        raise FullsizeDataError(f"{LAYOUT_FILE}: MMBench groups_by_options give {len(frame)} rows, "
                                f"not {cfg['rows']}")
    return frame


_OBJECTS = ("a dog", "a red car", "two people", "a clock", "a bridge", "a cat", "a tree", "a boat")


def mme_frame(rng: np.random.Generator) -> pd.DataFrame:
    """MME: per subtask and image a Yes question then a No one, sharing ``image_path``; the
    second refers to the first's image cell."""
    suffix = layout()["MME"]["question_suffix"]
    rows = []
    for category, pairs in mme_pairs().items():
        for pair in range(pairs):
            path, first = f"{category}/{pair:04d}.jpg", len(rows)
            shown, absent = rng.choice(len(_OBJECTS), 2, replace=False)
            for answer, thing in (("Yes", _OBJECTS[shown]), ("No", _OBJECTS[absent])):
                rows.append({"index": len(rows),
                             "image": _placeholder_image("MME", path) if len(rows) == first else str(first),
                             "question": f"Is there {thing} in this image?{suffix}", "answer": answer,
                             "category": category, "image_path": path})
    return pd.DataFrame(rows, columns=["index", "image", "question", "answer", "category", "image_path"])


FRAME_BUILDERS = {"DocVQA_VAL": docvqa_frame, "ChartQA_TEST": chartqa_frame,
                  "MMBench_DEV_EN": mmbench_frame, "MME": mme_frame}


def benchmark_frames(seed: int = 0, benchmarks: tuple[str, ...] = BENCHMARKS) -> dict[str, pd.DataFrame]:
    """The full-size frames of ``benchmarks`` (TSV layout: image cells, references included)."""
    return {name: FRAME_BUILDERS[name](np.random.default_rng([seed, BENCHMARKS.index(name)]))
            for name in benchmarks}


# ================================================================================= targets

# benchmark -> variant -> metric -> value
Targets = dict[str, dict[str, dict[str, float]]]


@dataclass(frozen=True)
class ScenarioTargets:
    targets: Targets
    same_as_base: frozenset[str] = field(default_factory=frozenset)  # benchmarks whose Lavender = base


def _aimable(benchmark: str) -> set[str]:
    """The metrics the maker can aim at."""
    if benchmark == "DocVQA_VAL":
        return {"Overall"}
    if benchmark == "ChartQA_TEST":
        return {"Overall", *layout()["ChartQA_TEST"]["splits"]}
    if benchmark == "MMBench_DEV_EN":
        return {"Overall", *layout()["MMBench_DEV_EN"]["groups"]}
    return {"perception", "reasoning", "total", *mme_pairs()}


def reference_targets(reference: Any) -> Targets:
    """Each row of a reference (``gate.verdicts.load_reference``): its base and Lavender value."""
    targets: Targets = {}
    for row in reference.rows:
        if row.benchmark not in BENCHMARKS or row.metric not in _aimable(row.benchmark):
            raise FullsizeDataError(f"{reference.path}: row {row.number} ({row.id}): the synthetic data "
                                    f"cannot aim at metric {row.metric!r} of {row.benchmark}")
        if row.metric == "total" and tuple(row.parts) != ("perception", "reasoning"):
            raise FullsizeDataError(f"{reference.path}: row {row.number} ({row.id}): MME total must "
                                    "be perception + reasoning")
        for variant in VARIANTS:
            targets.setdefault(row.benchmark, {v: {} for v in VARIANTS})[variant][row.metric] = \
                float(row.reported(variant))
    return targets


def scenario_names() -> list[str]:
    return list(layout()["scenario"])


def scenario_targets(reference: Any, scenario: str = "reproduce",
                     scenarios: Mapping[str, Any] | None = None) -> ScenarioTargets:
    """The reference's targets with the scenario's edits applied (``scenarios``: the
    ``[scenario]`` tables of ``fullsize_data.toml`` unless given)."""
    scenarios = layout()["scenario"] if scenarios is None else scenarios
    if scenario not in scenarios:
        raise FullsizeDataError(f"unknown scenario {scenario!r}; known: {', '.join(scenarios)}")
    targets = reference_targets(reference)
    same: set[str] = set()
    for number, edit in enumerate(scenarios[scenario].get("edit", []), start=1):
        where = f"{LAYOUT_FILE}: scenario {scenario!r} edit {number}"
        benchmark, variant = edit.get("benchmark"), edit.get("variant", "lavender")
        chosen = list(targets) if benchmark == "*" else [benchmark]
        if benchmark != "*" and benchmark not in targets:
            raise FullsizeDataError(f"{where}: benchmark {benchmark!r} has no targets in the reference")
        kinds = [k for k in ("gain_scale", "offset", "same_as_base") if k in edit]
        if len(kinds) != 1 or variant not in VARIANTS:
            raise FullsizeDataError(f"{where}: needs exactly one of gain_scale, offset, same_as_base "
                                    f"and a variant among {VARIANTS}")
        edited = 0
        for name in chosen:
            if kinds[0] == "same_as_base":
                if variant != "lavender":
                    raise FullsizeDataError(f"{where}: same_as_base edits the lavender variant only")
                same.add(name)
                targets[name]["lavender"] = dict(targets[name]["base"])
                edited += 1
                continue
            metrics = edit.get("metrics", list(targets[name][variant]))
            if benchmark == "*":  # every benchmark that has the metrics named
                metrics = [m for m in metrics if m in targets[name][variant]]
            for metric in metrics:
                if metric not in targets[name][variant]:
                    raise FullsizeDataError(f"{where}: {name} has no target {metric!r}")
                edited += 1
                base, value = targets[name]["base"][metric], targets[name][variant][metric]
                targets[name][variant][metric] = (base + edit["gain_scale"] * (value - base)
                                                  if kinds[0] == "gain_scale" else value + edit["offset"])
        if not edited:
            raise FullsizeDataError(f"{where}: no benchmark of the reference has the metrics {edit.get('metrics')}")
    return ScenarioTargets(targets, frozenset(same))


# ============================================================================ count solvers


def _binary_counts(sizes: Mapping[str, int], targets: Mapping[str, float]) -> dict[str, int]:
    """Units right per stratum (binary scores): strata with a target get the count whose
    percentage is nearest it; the others share what ``Overall`` leaves, in proportion to size
    (without an Overall target: ``free_accuracy``)."""
    counts = {s: min(n, max(0, round(targets[s] * n / 100))) for s, n in sizes.items() if s in targets}
    free = [s for s in sizes if s not in counts]
    if not free:
        return counts
    free_size = sum(sizes[s] for s in free)
    total = sum(sizes.values())
    if "Overall" in targets:
        rest = round(targets["Overall"] * total / 100) - sum(counts.values())
    else:
        rest = round(layout()["answers"]["free_accuracy"] * free_size)
    rest = min(free_size, max(0, rest))
    shares = {s: rest * sizes[s] // free_size for s in free}
    for s in sorted(free, key=lambda s: -(rest * sizes[s] % free_size))[: rest - sum(shares.values())]:
        shares[s] += 1
    return {**counts, **shares}


def _docvqa_plan(n: int, target: float) -> tuple[int, list[float]]:
    """(answers fully right, ANLS scores of near misses) whose mean × 100 is nearest ``target``:
    a value between two whole counts needs one near miss (a score in [0.5, 1)) or two."""
    wanted = target * n / 100
    whole = min(n, max(0, round(wanted)))
    if abs(100 * whole / n - target) < PRINT_HALF_STEP - 1e-9:  # prints as the target
        return whole, []
    below = math.floor(wanted)
    fraction = wanted - below
    if fraction >= 0.5:
        return below, [fraction]
    if below == 0:  # below one whole answer and a near miss scores at least 0.5
        return 0, []
    return below - 1, [(1 + fraction) / 2] * 2


def _mme_score(pairs: int, questions_right: int, both_right: int) -> float:
    return 100 * questions_right / (2 * pairs) + 100 * both_right / pairs


def _mme_split(pairs: int, m: int) -> tuple[int, int] | None:
    """(questions right q, pairs both right b) with q + 2b = m, b as within-pair correlation
    makes it: b/pairs ≈ a² + c·a·(1 − a) for accuracy a (c = ``pair_correlation``)."""
    c = layout()["answers"]["pair_correlation"]
    best = None
    for b in range(min(pairs, m // 4) + 1):
        q = m - 2 * b
        if q > pairs + b or q > 2 * pairs:
            continue
        a = q / (2 * pairs)
        gap = abs(b / pairs - (a * a + c * a * (1 - a)))
        if best is None or gap < best[0]:
            best = (gap, q, b)
    return None if best is None else (best[1], best[2])


@cache
def _mme_values(pairs: int) -> dict[int, float]:
    """Attainable m = q + 2b -> subtask score (acc + acc+)."""
    return {m: 50 * m / pairs for m in range(4 * pairs + 1) if _mme_split(pairs, m) is not None}


@cache
def _attainable(pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """The attainable m of a subtask and their scores, ascending."""
    values = _mme_values(pairs)
    return np.array(list(values)), np.array(list(values.values()))


def _nearest_m(pairs: int, target: float) -> int:
    ms, scores = _attainable(pairs)
    at = int(np.searchsorted(scores, target))
    near = [i for i in (at - 1, at) if 0 <= i < len(ms)]
    return int(ms[min(near, key=lambda i: abs(scores[i] - target))])


def _mme_free(free: list[str], pairs: Mapping[str, int], low: float, high: float) -> dict[str, int]:
    """m of every free subtask so that their sum lies in [low, high] (margins kept), as even as
    possible; the largest subtask is solved last, the two smallest others searched fully (one,
    when two would mean over 200,000 combinations), any others set to an even share."""
    aim = (low + high) / 2
    share = aim / len(free)
    ordered = sorted(free, key=lambda c: pairs[c])
    width = 2 if math.prod(len(_mme_values(pairs[c])) for c in ordered[:-1][:2]) <= 200_000 else 1
    last, searched, fixed = ordered[-1], ordered[:-1][:width], ordered[:-1][width:]
    base = {c: _nearest_m(pairs[c], share) for c in fixed}
    best = None
    for combination in itertools.product(*(_mme_values(pairs[c]) for c in searched)):
        chosen = {**base, **dict(zip(searched, combination))}
        partial = sum(_mme_values(pairs[c])[m] for c, m in chosen.items())
        chosen[last] = _nearest_m(pairs[last], aim - partial)
        total = partial + _mme_values(pairs[last])[chosen[last]]
        inside = low + 1e-6 <= total <= high - 1e-6
        spread = sum((_mme_values(pairs[c])[m] - share) ** 2 for c, m in chosen.items())
        key = (0 if inside else 1, spread if inside else abs(total - aim))
        if best is None or key < best[0]:
            best = (key, chosen)
    return best[1]


def _mme_plan(targets: Mapping[str, float]) -> dict[str, tuple[int, int]]:
    """(q, b) per subtask: targeted subtasks nearest their value; the others so that
    reasoning, perception and total print as targeted (reasoning first, then perception
    within both its own window and what total leaves)."""
    from lavender_checks.benchmarks.vlmeval_common import rules

    pairs, groups = mme_pairs(), rules("MME")
    m = {c: _nearest_m(pairs[c], targets[c]) for c in pairs if c in targets}
    exact = {}
    for group in ("reasoning", "perception"):
        members = list(groups[group])
        free = [c for c in members if c not in m]
        fixed = sum(_mme_values(pairs[c])[m[c]] for c in members if c in m)
        if free:
            if group in targets:
                low, high = targets[group] - PRINT_HALF_STEP, targets[group] + PRINT_HALF_STEP
            else:
                middle = 200 * layout()["answers"]["free_accuracy"] * len(free) + fixed
                low, high = middle - PRINT_HALF_STEP, middle + PRINT_HALF_STEP
            if group == "perception" and "total" in targets:
                rest = targets["total"] - exact["reasoning"]
                low, high = max(low, rest - PRINT_HALF_STEP), min(high, rest + PRINT_HALF_STEP)
                if low > high:  # the two windows do not meet: aim at perception's own
                    low = high = targets.get("perception", rest)
            m.update(_mme_free(free, pairs, low - fixed, high - fixed))
        exact[group] = sum(_mme_values(pairs[c])[m[c]] for c in members)
    return {c: _mme_split(pairs[c], m[c]) for c in pairs}


# ============================================================================= predictions


def _ease(rng: np.random.Generator, units: int) -> dict[str, np.ndarray]:
    """Latent ease of every unit for each variant (the Gaussian copula)."""
    rho = layout()["answers"]["latent_correlation"]
    base = rng.standard_normal(units)
    return {"base": base, "lavender": rho * base + math.sqrt(1 - rho * rho) * rng.standard_normal(units)}


def _ranked(ease: np.ndarray, members: np.ndarray) -> np.ndarray:
    """``members`` (unit positions) from easiest to hardest."""
    return members[np.argsort(-ease[members], kind="stable")]


def _docvqa_predictions(frame: pd.DataFrame, target: float, ease: np.ndarray,
                        rng: np.random.Generator) -> list[str]:
    answers = [docvqa_answers(cell) for cell in frame["answer"]]
    n = len(frame)
    full, near = _docvqa_plan(n, target)
    order = _ranked(ease, np.arange(n))
    predictions: list[str | None] = [None] * n
    for position in order[:full]:
        predictions[position] = answers[position][0]
    long_candidates = [p for p in order[full:] if len(answers[p][0]) >= 24]
    if len(long_candidates) < len(near):
        raise FullsizeDataError("DocVQA_VAL: too few long answers for the near misses a target needs")
    for position, score in zip(long_candidates, near):
        answer = answers[position][0]
        cuts = [answer[: len(answer) - d] for d in range(1, len(answer) // 2 + 1)]
        predictions[position] = min(cuts, key=lambda cut: abs(anls_score(answers[position], cut) - score))
    for position in range(n):
        if predictions[position] is None:  # wrong: another question's answer with ANLS 0
            for step in itertools.count(1):
                other = answers[(position + step * 7919) % n][0]
                if anls_score(answers[position], other) == 0.0:
                    predictions[position] = other
                    break
    return predictions


def _chartqa_wrong(answer: str, rng: np.random.Generator) -> str:
    try:
        value = float(answer)
    except ValueError:
        return _COUNTRIES[(_COUNTRIES.index(answer) + 1 + int(rng.integers(len(_COUNTRIES) - 1)))
                          % len(_COUNTRIES)] if answer in _COUNTRIES else "Germany"
    return f"{value * 1.5 + 3:g}"


def _chartqa_predictions(frame: pd.DataFrame, targets: Mapping[str, float], ease: np.ndarray,
                         rng: np.random.Generator) -> list[str]:
    splits = frame["split"].to_numpy()
    sizes = {s: int((splits == s).sum()) for s in dict.fromkeys(splits)}
    counts = _binary_counts(sizes, targets)
    right = np.zeros(len(frame), dtype=bool)
    for split, k in counts.items():
        right[_ranked(ease, np.flatnonzero(splits == split))[:k]] = True
    answers = frame["answer"].astype(str).tolist()
    predictions = []
    for answer, ok in zip(answers, right):
        prediction = answer if ok else _chartqa_wrong(answer, rng)
        assert relaxed_accuracy([answer], prediction) == float(ok)
        predictions.append(prediction)
    return predictions


def _mmbench_predictions(frame: pd.DataFrame, targets: Mapping[str, float], ease: np.ndarray,
                         rng: np.random.Generator) -> list[str]:
    groups = frame["index"].to_numpy() % CIRCULAR_OFFSET
    main = frame["index"].to_numpy() < CIRCULAR_OFFSET
    category_of = dict(zip(groups[main], frame["category"].to_numpy()[main]))
    group_ids = np.array(sorted(category_of))
    categories = np.array([category_of[g] for g in group_ids])
    sizes = {c: int((categories == c).sum()) for c in layout()["MMBench_DEV_EN"]["groups"]}
    counts = _binary_counts(sizes, targets)
    right = set()
    for category, k in counts.items():
        right.update(group_ids[_ranked(ease, np.flatnonzero(categories == category))[:k]].tolist())
    consistent = rng.random(len(group_ids)) < layout()["answers"]["consistent_wrong"]
    letter_bias = rng.integers(4, size=len(group_ids))
    # A wrong group that keeps one option: the text the main row shows under a wrong letter.
    wrong_text = {}
    for row in frame[main].itertuples(index=False):
        letters = [x for x in LETTERS if isinstance(getattr(row, x), str)]
        wrong = letters[(letters.index(row.answer) + 1) % len(letters)]
        wrong_text[row.index] = getattr(row, wrong)
    predictions = []
    for row in frame.itertuples(index=False):
        group = row.index % CIRCULAR_OFFSET
        letters = [x for x in LETTERS if isinstance(getattr(row, x), str)]
        if group in right:
            predictions.append(row.answer)
        elif consistent[group]:
            predictions.append(next(x for x in letters if getattr(row, x) == wrong_text[group]))
        else:  # one letter in every copy: right in at most the copies whose answer it is
            predictions.append(letters[letter_bias[group] % len(letters)])
    return predictions


def _mme_predictions(frame: pd.DataFrame, targets: Mapping[str, float], ease: np.ndarray,
                     rng: np.random.Generator) -> list[str]:
    plan = _mme_plan(targets)
    paths = frame["image_path"].to_numpy()
    images = list(dict.fromkeys(paths))
    category_of = dict(zip(paths, frame["category"].to_numpy()))
    categories = np.array([category_of[p] for p in images])
    yes_bias = rng.random(len(images)) < layout()["answers"]["yes_bias"]
    state = {}  # image -> "both", "one" or "none"
    for category, (q, b) in plan.items():
        order = _ranked(ease, np.flatnonzero(categories == category))
        for rank, position in enumerate(order):
            state[images[position]] = "both" if rank < b else "one" if rank < q - b else "none"
    position_of = {p: i for i, p in enumerate(images)}
    predictions = []
    for path, answer in zip(paths, frame["answer"]):
        kind = state[path]
        if kind == "both":
            predictions.append(answer)
        elif kind == "one":  # the same answer to both questions: right on one of them
            predictions.append("Yes" if yes_bias[position_of[path]] else "No")
        else:
            predictions.append("No" if answer == "Yes" else "Yes")
    return predictions


def _units(benchmark: str, frame: pd.DataFrame) -> int:
    if benchmark == "MMBench_DEV_EN":
        return int((frame["index"] < CIRCULAR_OFFSET).sum())
    if benchmark == "MME":
        return frame["image_path"].nunique()
    return len(frame)


def predictions_for_targets(frames: Mapping[str, pd.DataFrame], targets: ScenarioTargets,
                            seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """benchmark -> variant -> prediction of every row of ``frames[benchmark]``, in its order.
    A benchmark without targets is left out."""
    out: dict[str, dict[str, list[str]]] = {}
    makers = {"DocVQA_VAL": lambda f, t, e, r: _docvqa_predictions(f, t.get("Overall", 50.0), e, r),
              "ChartQA_TEST": _chartqa_predictions, "MMBench_DEV_EN": _mmbench_predictions,
              "MME": _mme_predictions}
    for benchmark, frame in frames.items():
        if benchmark not in targets.targets:
            continue
        number = BENCHMARKS.index(benchmark)
        ease = _ease(np.random.default_rng([seed, number, 1]), _units(benchmark, frame))
        out[benchmark] = {}
        for k, variant in enumerate(VARIANTS):
            if variant == "lavender" and benchmark in targets.same_as_base:
                out[benchmark][variant] = list(out[benchmark]["base"])
                continue
            rng = np.random.default_rng([seed, number, 2 + k])
            out[benchmark][variant] = makers[benchmark](frame, targets.targets[benchmark][variant],
                                                        ease[variant], rng)
    return out


def prediction_frames(frames: Mapping[str, pd.DataFrame], predictions: Mapping[str, Mapping[str, list[str]]]
                      ) -> dict[str, dict[str, pd.DataFrame]]:
    """The frames VLMEvalKit writes after inference (``vlmeval_io.prediction_frame``)."""
    from lavender_checks.vlmeval_io import prediction_frame

    return {b: {v: prediction_frame(frames[b], dict(zip(frames[b]["index"].tolist(), p)))
                for v, p in by_variant.items()} for b, by_variant in predictions.items()}


def score(frames: Mapping[str, Mapping[str, pd.DataFrame]]) -> dict[str, dict[str, dict[str, float]]]:
    """benchmark -> variant -> VLMEvalKit's metrics (MME with ``total``), by the real scorers."""
    return {b: {v: get_benchmark(b).score(f).metrics for v, f in by_variant.items()}
            for b, by_variant in frames.items()}


@dataclass(frozen=True)
class Miss:
    """A reference number the predictions do not print as targeted (the nearest count could
    not reach it: a scenario's target between two attainable values)."""

    row_id: str
    variant: str
    target: float
    scored: float

    def __str__(self) -> str:
        return f"{self.row_id} {self.variant}: target {self.target:.2f}, scores {self.scored:.2f}"


def misses(reference: Any, targets: ScenarioTargets, scores: Mapping[str, Mapping[str, Mapping[str, float]]]
           ) -> list[Miss]:
    """The reference rows whose scored value does not print (two decimals) as its target."""
    out = []
    for row in reference.rows:
        if row.benchmark not in scores:
            continue
        for variant in VARIANTS:
            scored = sum(scores[row.benchmark][variant][k] for k in row.parts)
            target = targets.targets[row.benchmark][variant][row.metric]
            if f"{scored:.2f}" != f"{target:.2f}":
                out.append(Miss(row.id, variant, target, scored))
    return out


# ================================================================================= folders


@dataclass
class VlmevalFolder:
    root: Path
    prediction_files: dict[str, dict[str, Path]]  # benchmark -> variant -> file
    lmu_data: Path | None
    misses: list[Miss]  # targets the predictions do not print as targeted
    seconds: float


def _write_manifest(folder: Path, written: Mapping[str, tuple[Path, int]]) -> None:
    lines = ["# Written by `lavender-checks make-vlmeval-folder`: synthetic full-size benchmarks, NOT",
             "# VLMEvalKit's files; lavender_checks.data.load_benchmark recognises them by md5 and",
             "# marks their scores as not comparable with any report.", "synthetic = true"]
    for name, (path, rows) in written.items():
        data = path.read_bytes()
        lines += ["", f"[files.{name}]", f'tsv = "{path.name}"', f'md5 = "{hashlib.md5(data).hexdigest()}"',
                  f"rows = {rows}", f"bytes = {len(data)}"]
    (folder / MANIFEST).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_vlmeval_folder(out: str | Path, scenario: str = "reproduce", reference: str | Path | None = None,
                         *, seed: int = 0, lmu_data: bool = True, suffix: str = ".xlsx") -> VlmevalFolder:
    """Write ``<out>/<model>/<model>_<dataset><suffix>`` for both models and every benchmark of
    the reference, and (``lmu_data``) the TSVs with their manifest in ``<out>/LMUData``."""
    from lavender_checks.gate.verdicts import DEFAULT_REFERENCE, load_reference
    from lavender_checks.synthetic.minidata import write_tsv
    from lavender_checks.vlmeval_io import write_prediction_file

    started = time.perf_counter()
    loaded = load_reference(reference or DEFAULT_REFERENCE)
    targets = scenario_targets(loaded, scenario)
    benchmarks = tuple(b for b in BENCHMARKS if b in targets.targets)
    frames = benchmark_frames(seed, benchmarks)
    predicted = prediction_frames(frames, predictions_for_targets(frames, targets, seed))
    missed = misses(loaded, targets, score(predicted))
    root = Path(out)
    files: dict[str, dict[str, Path]] = {}
    for benchmark, by_variant in predicted.items():
        for variant, frame in by_variant.items():
            model = MODEL_NAMES[variant]
            path = write_prediction_file(frame, root / model / f"{model}_{benchmark}{suffix}")
            files.setdefault(benchmark, {})[variant] = path
    lmu = None
    if lmu_data:
        lmu = root / LMU_FOLDER
        lmu.mkdir(parents=True, exist_ok=True)
        written = {}
        for benchmark, frame in frames.items():
            path = lmu / get_benchmark(benchmark).spec.tsv
            write_tsv(frame, path)
            written[benchmark] = (path, len(frame))
        _write_manifest(lmu, written)
    return VlmevalFolder(root, files, lmu, missed, time.perf_counter() - started)


# ================================================================================= command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, metavar="OUT", help="the work dir to write")
    parser.add_argument("--scenario", default="reproduce", choices=scenario_names(),
                        help="; ".join(f"{n}: {s['description']}" for n, s in layout()["scenario"].items()))
    parser.add_argument("--reference", type=Path, default=None, metavar="FILE",
                        help="the reference whose numbers the predictions hit (default: the seed report)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the frames and predictions (default 0)")
    parser.add_argument("--no-lmu-data", dest="lmu_data", action="store_false",
                        help=f"do not write the TSVs to OUT/{LMU_FOLDER}")


def main(args: argparse.Namespace) -> int:
    from lavender_checks.errors import EXIT_INPUT, error_line
    from lavender_checks.gate.verdicts import ReferenceFileError
    from lavender_checks.run.config import RunInputError, check_writable_folder

    # Error lines go to stderr, as every command's do (stdout keeps the files written).
    if args.reference is not None and not args.reference.is_file():
        print(error_line("make-vlmeval-folder", f"--reference {args.reference}: no such file"), file=sys.stderr)
        return EXIT_INPUT
    try:
        check_writable_folder("OUT", args.out)  # before seconds of building frames
        folder = write_vlmeval_folder(args.out, args.scenario, args.reference, seed=args.seed,
                                      lmu_data=args.lmu_data)
    except (FullsizeDataError, ReferenceFileError, RunInputError) as exc:
        print(error_line("make-vlmeval-folder", exc), file=sys.stderr)
        return EXIT_INPUT
    for benchmark, by_variant in folder.prediction_files.items():
        for path in by_variant.values():
            print(f"{benchmark:16s} {path}")
    if folder.lmu_data is not None:
        print(f"TSVs             {folder.lmu_data} (synthetic: gate them with --allow-noncomparable)")
    if folder.misses:
        print(f"{len(folder.misses)} target(s) not printed as targeted (the nearest attainable count is used):")
        for miss in folder.misses:
            print(f"  {miss}")
    print(f"scenario {args.scenario}, seed {args.seed}: written in {folder.seconds:.1f} s; "
          f"gate it with: lavender-checks run --from-vlmeval {folder.root}")
    return 0
