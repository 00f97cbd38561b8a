"""Full-size smoke figures of the batched engine (``--engine generate``; CUDA).

Builds Llama-3.2-11B-Vision with random weights and a random Lavender-shaped LoRA
(``lavender_checks.synthetic.fullsize.fullsize_pair``), then runs ``engines.batched.generate``
(what ``BatchedEngine`` runs, and what the fast engine falls back to) at several batch sizes
for both variants, on 4-tile images and ~120-token prompts. Random weights almost never emit
EOS, so rows run to ``--new-tokens``. Prints samples/s and peak memory per batch size, and
writes them as JSON.

    python scripts/fullsize_smoke.py --batch-sizes 1,8,32 --out reports/fullsize-smoke.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--rows", type=int, default=32, help="rows per batch size and variant (batch 1 uses 4)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("reports/fullsize-smoke.json"))
    parser.add_argument("--tiny-cpu", action="store_true", help="check the script on the tiny pair on CPU")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from lavender_checks.engines.batched import generate
    from lavender_checks.engines.request import GenerationRequest
    from lavender_checks.prompts import Prompt, chat_text
    from lavender_checks.synthetic.fullsize import fullsize_pair

    if args.tiny_cpu:  # the script's own check: the same calls on the tiny pair, no timings worth reading
        from lavender_checks.model import load_pair
        from lavender_checks.synthetic.tiny import ensure_tiny_checkpoints

        class _NoCuda:  # stand-in for torch.cuda's counters on CPU
            def __getattr__(self, name):
                return {"get_device_name": lambda *_: "cpu (tiny check)"}.get(name, lambda *_: 0)

        cuda = _NoCuda()
        checkpoints = ensure_tiny_checkpoints()
        started = time.perf_counter()
        pair = load_pair(checkpoints.base, checkpoints.adapter, device="cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("fullsize_smoke.py needs CUDA: run it on a GPU machine")
    else:
        cuda = torch.cuda
        started = time.perf_counter()
        pair = fullsize_pair(device="cuda")
    cuda.synchronize()
    build_s = time.perf_counter() - started
    loaded_gib = cuda.memory_allocated() / 2**30

    rng = np.random.default_rng(0)
    question = " ".join(["What is the total amount shown on this invoice for the second quarter?"] * 8)

    def requests(n: int, tag: str) -> list:
        out = []
        for i in range(n):
            # 1120 x 1120 noise: four 560-px tiles, distinct per row (no vision sharing).
            pixels = rng.integers(0, 256, size=(1120, 1120, 3), dtype=np.uint8)
            text = chat_text(pair.processor, Prompt(f"{question} ({tag}{i})", image_first=True))
            out.append(GenerationRequest(key=f"{tag}{i}", text=text, images=[Image.fromarray(pixels)],
                                         max_new_tokens=args.new_tokens))
        return out

    figures = []
    # warm-up: kernels, allocator
    generate(pair, requests(2, "warm"), "base", batch_size=2, progress=False)
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        rows = 4 if batch_size == 1 else max(args.rows, batch_size)
        for variant in ("base", "lavender"):
            reqs = requests(rows, f"b{batch_size}{variant[0]}")
            cuda.reset_peak_memory_stats()
            cuda.synchronize()
            t0 = time.perf_counter()
            preds = generate(pair, reqs, variant, batch_size=batch_size, progress=False)
            cuda.synchronize()
            seconds = time.perf_counter() - t0
            assert set(preds) == {r.key for r in reqs}, "a row came back without its prediction"
            row = {
                "batch_size": batch_size, "variant": variant, "rows": rows, "seconds": round(seconds, 3),
                "samples_per_s": round(rows / seconds, 3),
                "peak_gib": round(cuda.max_memory_allocated() / 2**30, 2),
            }
            figures.append(row)
            print(json.dumps(row), flush=True)

    report = {
        "device": cuda.get_device_name(0), "torch": torch.__version__,
        "build_seconds": round(build_s, 2), "loaded_gib": round(loaded_gib, 2),
        "lora_modules": pair.lora_modules_applied, "new_tokens_cap": args.new_tokens,
        "image": "1120x1120 noise (4 tiles)", "figures": figures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['device']}: built in {build_s:.1f} s, {loaded_gib:.1f} GiB loaded")
    print(f"{'batch':>5} {'variant':>9} {'samples/s':>10} {'peak GiB':>9}")
    for row in figures:
        print(f"{row['batch_size']:>5} {row['variant']:>9} {row['samples_per_s']:>10.2f} {row['peak_gib']:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
