"""Eager FP8 delayed forward + backward passes without optimizer steps: TE's weight cast every pass
(``is_first_microbatch=None``) against one cast reused (``True`` at the first timed-phase pass, then ``False``).

One model in one process; milliseconds per pass (median of 15 after 4 warm-up passes) and peak memory for each
mode, in the order none, cache, none again (the cached copies stay allocated, which the third row shows).

    python3 benchmarks/weight_cache_probe.py --shape B --out weight_cache_probe_B.json
"""

import argparse
import json
import statistics

import torch

from te_llama.benchmark import SHAPES, prepare_variant, timed_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="B", choices=[name for name in SHAPES if name != "tiny"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, _, ids = prepare_variant("te_fp8_delayed", SHAPES[args.shape], torch.device("cuda"))
    model.cache_fp8_weights = False  # the flag is passed by hand below
    results = {}
    for mode in ("none", "cache", "none2"):
        def step(i):
            extra = {} if mode.startswith("none") else {"is_first_microbatch": i == 0}
            loss = model(input_ids=ids, labels=ids, **extra).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for i in range(4):
            step(i)
        times = []
        for i in range(4, 19):
            ms, loss = timed_ms(lambda: step(i))
            times.append(ms)
        results[mode] = dict(ms=statistics.median(times), loss=loss.item(),
                             alloc_gib=torch.cuda.max_memory_allocated() / 2**30,
                             reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                             alloc_now_gib=torch.cuda.memory_allocated() / 2**30)
        print(mode, results[mode], flush=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
