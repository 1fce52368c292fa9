"""Step time of the overlapped gradient averaging against averaging after backward, in the same processes.

Both synchronizers train the example's character GPT on 2 gloo CPU ranks, alternating in one run, so
that a shared machine's load hits both alike: ``GradientSynchronizer`` (buckets start during backward)
and ``PostBackwardAveraging`` from tests/test_data_parallel.py (what parti did before). The figure is
the ratio of median step times, new / old (below 1.0: the overlap is faster).

    python benchmarks/overlap_ab.py                        # 4 blocks of width 128, batch 16 x 128
    python benchmarks/overlap_ab.py --layers 2 --width 64 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "helpers"), str(REPO / "examples")]


def _rank(layers: int, width: int, block: int, batch: int, rounds: int, steps: int) -> dict[str, list[float]]:
    import torch
    import torch.distributed as dist
    from test_data_parallel import PostBackwardAveraging

    from parti_lightning.parallel.data import GradientSynchronizer

    from char_gpt import CharGPT

    torch.manual_seed(0)
    model = CharGPT(n_layer=layers, n_embd=width, block_size=block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(dist.get_rank())
    x, y = (torch.randint(0, 90, (batch, block), generator=generator) for _ in range(2))
    times: dict[str, list[float]] = {"after backward": [], "overlapped": []}
    for _ in range(rounds):
        for kind in times:
            sync = (GradientSynchronizer(model, dist.group.WORLD) if kind == "overlapped"
                    else PostBackwardAveraging(model, dist.group.WORLD))
            for step in range(steps + 2):  # two warm-up steps
                if step == 2:
                    dist.barrier()
                    start = time.perf_counter()
                model._loss(model(x), y).backward()
                sync.sync()
                optimizer.step()
                optimizer.zero_grad()
            times[kind].append((time.perf_counter() - start) / steps)
            sync.remove()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and variant")
    args = parser.parse_args()
    from dist_utils import run_distributed

    # The ranks unpickle the function by module name, and this script runs as `__main__`.
    sys.path.insert(0, str(Path(__file__).parent))
    from overlap_ab import _rank as rank_fn

    times = run_distributed(rank_fn, 2, args.layers, args.width, args.block_size, args.batch_size, args.rounds,
                            args.steps, timeout=1800)[0]
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    for kind, values in times.items():
        print(f"{kind:>15}: median {medians[kind] * 1e3:.1f} ms/step over {len(values)} rounds"
              f" (min {min(values) * 1e3:.1f}, max {max(values) * 1e3:.1f})")
    print(f"overlapped / after backward step time: {medians['overlapped'] / medians['after backward']:.3f}")


if __name__ == "__main__":
    main()
