"""Write the reference values that tests/unit/test_sequential.py checks the stop-early
confidence sequence against: the authors' own implementation, confseq 0.0.11's
``predmix_empbern_twosided_cs`` (Waudby-Smith & Ramdas), on fixed inputs.

confseq needs numpy < 2 (it uses ``np.float_``) and scipy + multiprocess; run it in an
environment of its own, with confseq's source (its sdist's ``src/``) on the path:

    python -m venv /tmp/csvenv && /tmp/csvenv/bin/pip install "numpy<2" scipy multiprocess
    pip download --no-deps confseq==0.0.11 && tar xzf confseq-0.0.11.tar.gz
    PYTHONPATH=confseq-0.0.11/src /tmp/csvenv/bin/python scripts/confseq_reference_values.py

It rewrites tests/unit/data/confseq_predmix_eb_wor.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from confseq.predmix import predmix_empbern_twosided_cs

OUT = Path(__file__).resolve().parent.parent / "tests" / "unit" / "data" / "confseq_predmix_eb_wor.json"


def main() -> None:
    rng = np.random.default_rng(20261207)
    cases = [
        dict(name="bernoulli 0.3, N 500", x=(rng.random(200) < 0.3).astype(float), N=500, alpha=0.05,
             truncation=0.5, fixed_n=50),
        dict(name="uniform, N 1000", x=rng.random(300), N=1000, alpha=0.01, truncation=0.9, fixed_n=100),
        dict(name="three values, whole population of 200", x=rng.choice([0.0, 0.5, 1.0], 200), N=200,
             alpha=0.001, truncation=0.5, fixed_n=None),
        dict(name="all 0.5 (no change), N 2500", x=np.full(150, 0.5), N=2500, alpha=1e-4, truncation=0.9,
             fixed_n=250),
    ]
    out = []
    for case in cases:
        lo, hi = predmix_empbern_twosided_cs(case["x"], alpha=case["alpha"], truncation=case["truncation"],
                                             N=case["N"], fixed_n=case["fixed_n"])
        out.append({**case, "x": case["x"].tolist(), "lower": np.asarray(lo).tolist(),
                    "upper": np.asarray(hi).tolist()})
    OUT.write_text(json.dumps({"source": "confseq 0.0.11, confseq.predmix.predmix_empbern_twosided_cs",
                               "cases": out}) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
