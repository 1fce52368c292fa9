"""How well the planner predicts and chooses: per-rank peak memory and step time against real CPU runs.

For each model (the example's character GPT, and Hugging Face ``transformers`` models: see below) and each
plan (ddp, zero1, zero2, zero3, each with and without activation checkpointing of the blocks; tensor and
pipeline parallel over both ranks), the planner's prediction (``parti_lightning.planner.estimate`` on a
meta-device profile, a real CPU copy's for HF models, and this machine's cached hardware profile) is set
against a real run: ``Trainer(accelerator="cpu", devices=2, strategy=PartiStrategy(plan))`` in a subprocess,
as ``benchmarks/storage_memory.py`` runs them (Lightning's launcher re-runs this script for the other ranks).
``--ranks 4`` runs every plan on 4 ranks instead (tensor and pipeline degree 2 with data parallelism 2; more
ranks than cores are shared, and slow).

Then the choice, over a grid of cells: each model, with no memory limit and with a budget in the middle of
each gap between two consecutive plans' measured peaks (so that only the plans measured below it fit, each
with half the gap as margin; gaps under 3%, the spread of one plan's peak between runs, get none;
``--cells peaks`` puts the budgets at the peaks themselves, where a plan fits only if its prediction is
exact or over). In each cell the planner chooses
among the plans of the grid from its predictions (``choose_plan(..., plans=...)``), and the choice is right
when it fits (measured) and its measured time per sample is within the planner's tie tolerance (5%) of the
fastest plan that fits. The budget is what the model may add to a bare rank, and the planner chooses as a user's
``plan="auto"`` does, with its defaults: on CPU no headroom, and each plan must fit with its margin (0.3 of
the freed heap glibc keeps, the part of the peak that varies between models and runs; 1.2 times it with
checkpointing or under a pipeline, 1.8 times under tensor parallelism), so that a plan measured just
below a budget may be passed over. ``--no-margin`` judges the predictions alone (exact predictions would be
right in every cell); ``--headroom 0.1`` keeps 10% of the rank's memory free on top.

- measured memory: the larger rank's peak RSS (``VmHWM``; ``ru_maxrss`` would carry this driver's over exec)
  minus its RSS just before the model is
  built (interpreter, torch, Lightning and parti already imported). Predicted: the planner's peak less
  its per-process overhead (the measured RSS of a bare rank), so both count what the model and its
  training add. Process-group buffers, the dataloader and allocator slack are in the measurement and
  not in the model: that is part of the error this reports.
- measured step time: the median interval between rank 0's ``on_train_batch_end`` calls after
  ``--warmup`` steps.

Models (``--models``): ``LxW`` is the example's CharGPT with L blocks of width W (e.g. ``4x256``);
``family:LxW`` is a Hugging Face model built from its config (nothing downloaded) at the library's shipped
defaults but for the sizes: ``llama`` (``LlamaForCausalLM``), ``gpt2`` (``GPT2LMHeadModel``, its head tied),
``bert`` (``BertForSequenceClassification``, 2 labels as shipped), and ``neox`` (``GPTNeoXForCausalLM``, held out:
no rule or margin of the cost model was set from it). Sizes: L layers, hidden W, W // 64 heads,
MLP 4W, vocabulary 8000, positions = ``--block-size``; ``use_cache``, the attention implementation and
dropout stay as shipped. Its LightningModule's ``training_step`` returns ``model(**batch).loss``
(``input_ids``, an all-ones ``attention_mask``, ``labels``: the ids for the decoders, a class for BERT),
AdamW, on random tokens (fixed seed) through Lightning's distributed sampler. HF models are profiled on a
real CPU copy (their mask code reads values, which meta tensors cannot give). A plan whose run fails is
reported as failed and left out of the cells. At the end: figures pooled per family (``chargpt``, ``llama``,
``gpt2``, ``bert``, ``neox``) and overall: (model, plan) pairs with memory within ±15%, time within ±25%, cells right.

    python benchmarks/planner_accuracy.py --quick   # one 3M-parameter model, 6 plans: about 3 minutes on 2 cores
    python benchmarks/planner_accuracy.py           # two models (3M, 19M), 11 plans: about 15 minutes
    python benchmarks/planner_accuracy.py --models llama:2x128 --plans ddp zero3 --steps 4 --warmup 2  # about 1 minute
    # CharGPT and three HF families at two sizes (3M-20M parameters), 7 plans: about 13 minutes on 2 cores
    python benchmarks/planner_accuracy.py --models 4x256 llama:4x256 llama:6x384 gpt2:4x256 gpt2:6x384 \\
        bert:4x256 bert:6x384 --plans ddp ddp+ac zero1 zero3 zero3+ac tp pp --steps 6 --warmup 2
    python benchmarks/planner_accuracy.py --measured a.json b.json   # predictions again, runs pooled: seconds
    python benchmarks/planner_accuracy.py --measured b.json --oracle a.json  # run a's peaks and times choosing for b's
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from parti_lightning.rss import peak_rss_bytes

REPO = Path(__file__).resolve().parents[1]
MIB = 1024**2
PLANS: dict[str, dict[str, str]] = {
    "ddp": {"preset": "ddp"}, "ddp+ac": {"preset": "ddp", "activation_checkpointing": "blocks"},
    "zero1": {"preset": "zero1"}, "zero1+ac": {"preset": "zero1", "activation_checkpointing": "blocks"},
    "zero2": {"preset": "zero2"}, "zero2+ac": {"preset": "zero2", "activation_checkpointing": "blocks"},
    "zero3": {"preset": "zero3"}, "zero3+ac": {"preset": "zero3", "activation_checkpointing": "blocks"},
    # Model parallel over two ranks (each tensor or pipeline group gets the batch a data-parallel rank gets).
    "tp": {"preset": "tp", "tensor": 2}, "pp": {"preset": "pp", "pipeline": 2},
    "pp1f1b": {"preset": "pp", "pipeline": 2, "schedule": "1f1b"},
}
TIE_TOLERANCE = 0.05  # the planner's default
# The spread of one plan's measured peak between runs here (tensor parallel on 4x256: 153 and 158 MiB).
MIN_GAP = 0.03
QUICK_PLANS = ("ddp", "ddp+ac", "zero1", "zero2", "zero3", "zero3+ac")
# The pooled figures' tolerances: a prediction within them is good enough to choose by.
MEMORY_WITHIN, TIME_WITHIN = 0.15, 0.25
CHARGPT = "chargpt"
# Hugging Face families: (config class, model class), looked up in ``transformers`` by name.
HF_FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "bert": ("BertConfig", "BertForSequenceClassification"),
    # Held out: none of the cost model's rules or margins were set from it (parallel attention and MLP, untied head).
    "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
}
# Moderate: at width 256-384 the embedding (and an untied head) weigh about as much as one or two blocks, so
# the trunk, which the plans split, stays most of the model.
HF_VOCAB = 8000
HF_NUM_LABELS = 2  # BertConfig's shipped num_labels: BERT's labels are one of these classes per sample
# Token ids below this are special tokens (pad, bos, eos) in some configs: random batches leave them out.
FIRST_TOKEN = 4
DATA_SEED = 1234


def _parse(spec: str) -> tuple[str, int, int]:
    """``LxW`` (CharGPT) or ``family:LxW`` (Hugging Face) -> (family, layers, width)."""
    family, _, size = spec.rpartition(":")
    family = family or CHARGPT
    if family != CHARGPT and family not in HF_FAMILIES:
        raise SystemExit(f"{spec}: unknown family {family!r} (known: {', '.join([CHARGPT, *HF_FAMILIES])})")
    layers, width = (int(v) for v in size.split("x"))
    return family, layers, width


def _hf_sizes(family: str, layers: int, width: int, block_size: int) -> dict[str, Any]:
    """The config's size fields, each family naming them its own way; everything else stays as shipped."""
    heads = max(1, width // 64)
    if family == "gpt2":
        # The MLP is 4 * n_embd as shipped (n_inner=None). The shipped bos/eos id (50256) lies outside this
        # vocabulary: moved inside it, as tests/helpers/zoo.py does (neither enters the loss).
        return {"vocab_size": HF_VOCAB, "n_embd": width, "n_layer": layers, "n_head": heads,
                "n_positions": block_size, "bos_token_id": 1, "eos_token_id": 2}
    return {"vocab_size": HF_VOCAB, "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
            "num_attention_heads": heads, "max_position_embeddings": block_size}


class HfModule(L.LightningModule):
    """A Hugging Face model as a user's LightningModule trains it: the loss the model computes from ``labels=``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


class RandomTokens(Dataset):
    """``count`` sequences of ``block_size`` random tokens, each a dict as the family's model takes it.

    A private generator: every rank builds the same samples (without touching the global random state)
    before the distributed sampler splits them, as ``CharDataModule``'s windows are built.
    """

    def __init__(self, family: str, count: int, block_size: int) -> None:
        generator = torch.Generator().manual_seed(DATA_SEED)
        self.ids = torch.randint(FIRST_TOKEN, HF_VOCAB, (count, block_size), generator=generator)
        # Decoders predict the next token from labels=input_ids (the model shifts them); BERT classifies.
        self.labels = (torch.randint(0, HF_NUM_LABELS, (count,), generator=generator) if family == "bert"
                       else self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[index]}


def _hf_data(family: str, args: argparse.Namespace) -> RandomTokens:
    # Enough samples that every data-parallel rank (at most --ranks of them) gets --steps batches in one epoch.
    return RandomTokens(family, args.steps * args.batch_size * args.ranks, args.block_size)


def _import(family: str) -> None:
    """Import the code that builds ``family``'s model, so that a rank's baseline RSS holds it and the model's
    measured memory does not (``transformers`` imports a model's module on first access to its class)."""
    if family == CHARGPT:
        sys.path.insert(0, str(REPO / "examples"))
        import char_gpt  # noqa: F401
    else:
        import transformers

        for name in HF_FAMILIES[family]:
            getattr(transformers, name)


def _model(spec: str, block_size: int) -> L.LightningModule:
    family, layers, width = _parse(spec)
    if family == CHARGPT:
        sys.path.insert(0, str(REPO / "examples"))
        from char_gpt import CharGPT

        return CharGPT(n_layer=layers, n_embd=width, n_head=max(1, width // 64), block_size=block_size)
    import transformers

    config_class, model_class = HF_FAMILIES[family]
    config = getattr(transformers, config_class)(**_hf_sizes(family, layers, width, block_size))
    return HfModule(getattr(transformers, model_class)(config))


# ------------------------------------------------------------------------------------------- worker


def _worker(args: argparse.Namespace) -> None:
    import psutil

    from parti_lightning import PartiAccelerator, PartiStrategy

    family, _, _ = _parse(args.spec)
    _import(family)
    baseline = psutil.Process().memory_info().rss
    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_batch_end(self, *_: Any) -> None:
            stamps.append(time.perf_counter())

    L.seed_everything(0, verbose=False)
    model = _model(args.spec, args.block_size)
    trainer = L.Trainer(
        accelerator=PartiAccelerator("cpu", oversubscribe=True), devices=args.ranks,
        strategy=PartiStrategy(plan=json.loads(args.plan)), max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[Stamp()],
    )
    if family == CHARGPT:
        from char_gpt import CharDataModule

        trainer.fit(model, datamodule=CharDataModule(block_size=args.block_size, batch_size=args.batch_size))
    else:
        # As CharDataModule's loader: shuffled, full batches only; the Trainer swaps in its distributed sampler
        # over the plan's data-parallel ranks.
        loader = DataLoader(_hf_data(family, args), batch_size=args.batch_size, shuffle=True, drop_last=True)
        trainer.fit(model, train_dataloaders=loader)
    intervals = [b - a for a, b in zip(stamps[args.warmup - 1 : -1], stamps[args.warmup :], strict=True)]
    result = {"baseline": baseline, "peak": peak_rss_bytes(),
              "step_s": statistics.median(intervals)}
    Path(args.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


class RunFailed(Exception):
    """A plan's run brought back fewer results than ranks; the message is its error lines."""


def _error_lines(stderr: str) -> str:
    """The distinct exception lines of a failed run's output (every rank's), in order: the first is usually the
    cause, the others its peers' reaction to it."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Exit|Interrupt)\b", line)]
    distinct = list(dict.fromkeys(line[:300] for line in errors))
    return " | ".join(distinct[:3]) or (lines[-1][:300] if lines else "no output")


def _run(args: argparse.Namespace, spec: str, plan: str, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True)
    value = json.dumps(_plan_value(plan, args.ranks))
    command = [sys.executable, __file__, "--worker", "--out", str(out), "--plan", value, "--spec", spec,
               "--batch-size", str(args.batch_size), "--block-size", str(args.block_size), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--ranks", str(args.ranks)]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    # A session of its own: a hung run's ranks (Lightning's launcher starts the others as its children) end together.
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        stderr += f"\nTimeoutError: no result after {args.run_timeout} s"
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if len(ranks) != args.ranks:
        raise RunFailed(f"exit code {process.returncode}: {_error_lines(stderr)}")
    if process.returncode:  # both ranks finished and wrote their results; the crash came at shutdown
        print(f"{plan}: exit code {process.returncode} after both ranks wrote their results", flush=True)
    return {"memory": max(r["peak"] - r["baseline"] for r in ranks), "step_s": ranks[0]["step_s"]}


# --------------------------------------------------------------------------------------------- main


def _plan_value(plan: str, ranks: int) -> dict[str, Any]:
    """The plan as given to the strategy: model-parallel plans keep degree 2 and add data parallelism beyond 2 ranks."""
    value: dict[str, Any] = dict(PLANS[plan])
    if ("tensor" in value or "pipeline" in value) and ranks > 2:
        value["data"] = ranks // 2
    return value


def _resolved(plan: str, ranks: int) -> Any:
    from parti_lightning.plan import PartitionPlan

    return PartitionPlan.from_value(_plan_value(plan, ranks)).resolve(ranks, ranks)


def _predict(args: argparse.Namespace, spec: str, plans: list[str]) -> tuple[dict, Any, Any]:
    from parti_lightning.planner import HardwareProfile, estimate, profile_model
    from parti_lightning.planner.search import refusal
    from parti_lightning.planner.timing import time_blocks

    family, _, _ = _parse(spec)
    if family == CHARGPT:
        tokens = torch.zeros(args.batch_size, args.block_size, dtype=torch.long)
        batch: Any = (tokens, tokens)
        with torch.device("meta"):
            module = _model(spec, args.block_size)
    else:
        # On the CPU, not meta: HF's mask code reads values, so profile_model profiles a real copy of it anyway.
        torch.manual_seed(0)
        module = _model(spec, args.block_size)
        data = _hf_data(family, args)
        batch = default_collate([data[i] for i in range(args.batch_size)])  # one data-parallel rank's batch
    profile = time_blocks(module, batch, profile_model(module, batch), ranks_per_node=args.ranks)
    hardware = HardwareProfile.measure("cpu", ranks_per_node=args.ranks)
    predictions = {}
    for name in plans:
        resolved = _resolved(name, args.ranks)
        est = estimate(profile, hardware, resolved, args.ranks)
        predictions[name] = {"memory": est.peak_bytes - hardware.process_overhead_bytes, "step_s": est.seconds,
                             "refusal": refusal(profile, resolved)}
    return predictions, profile, hardware


def _choice(profile: Any, hardware: Any, plans: list[str], ranks: int, budget: float | None, headroom: float | None,
            ) -> str | None:
    """The planner's choice among ``plans`` with ``budget`` bytes per rank above the process's own (None: no limit)."""
    from parti_lightning.planner import NoPlanFits, choose_plan

    if budget is not None:
        # The budget as a user gives it (the whole rank's memory), so that the headroom applies to it all.
        hardware = dataclasses.replace(hardware, memory_bytes=int(budget) + hardware.process_overhead_bytes)
    resolved = [_resolved(p, ranks) for p in plans]
    try:
        chosen = choose_plan(profile, hardware, world_size=ranks, ranks_per_node=ranks, headroom=headroom,
                             tie_tolerance=TIE_TOLERANCE, plans=resolved).chosen
    except NoPlanFits:
        return None
    return plans[resolved.index(chosen)]


def _budgets(peaks: list[float], at: str) -> list[float]:
    """Each cell's budget, largest first: each measured peak (``"peaks"``), or the middle (geometric) of each gap
    between consecutive peaks (``"gaps"``): there the plans on either side have half the gap as margin, where
    a budget equal to a plan's peak asks its prediction to be exact to the byte. Gaps narrower than a run's
    own spread (``MIN_GAP``) get no cell: which side of one a plan falls on is the measurement's noise."""
    ordered = sorted(set(peaks), reverse=True)
    if at == "peaks":
        return ordered
    gaps = zip(ordered, ordered[1:], strict=False)
    return [math.sqrt(high * low) for high, low in gaps if high > low * (1 + MIN_GAP)]


def _oracle_choice(plans: list[str], oracle: dict, ranks: int, budget: float | None) -> str | None:
    """The choice a planner whose every prediction were another run's measurement would make: the plan ``oracle``
    measured fastest per sample among those it measured within ``budget`` (ties to the simpler, as the planner)."""
    known = [p for p in plans if p in oracle and (budget is None or oracle[p]["memory"] <= budget)]
    if not known:
        return None
    rate = {p: oracle[p]["step_s"] / _resolved(p, ranks).data_parallel_size for p in known}
    fastest = min(rate.values())
    return next(p for p in known if rate[p] <= fastest * (1 + TIE_TOLERANCE))


def _cells(model: str, family: str, profile: Any, hardware: Any, plans: list[str], measured: dict, ranks: int,
           headroom: float | None, at: str, oracle: dict | None = None) -> list[dict]:
    """One cell per budget: none, then one per measured peak or per gap between them (see ``_budgets``).
    ``oracle``: another run's measurements, which choose instead of the planner (see ``--oracle``)."""
    per_sample = {p: measured[p]["step_s"] / _resolved(p, ranks).data_parallel_size for p in plans}
    cells = []
    for budget in [None, *_budgets([measured[p]["memory"] for p in plans], at)]:
        fits = [p for p in plans if budget is None or measured[p]["memory"] <= budget]
        fastest = min(fits, key=per_sample.__getitem__)
        chosen = (_choice(profile, hardware, plans, ranks, budget, headroom) if oracle is None
                  else _oracle_choice(plans, oracle, ranks, budget))
        right = chosen in fits and per_sample[chosen] <= per_sample[fastest] * (1 + TIE_TOLERANCE)
        cells.append({"model": model, "family": family, "budget_mib": None if budget is None else budget / MIB,
                      "fits": fits, "chosen": chosen, "measured_fastest": fastest, "right": right,
                      "chosen_vs_fastest": per_sample[chosen] / per_sample[fastest] if chosen in fits else None})
    return cells


def _keep_fastest(runs: dict[str, dict[str, Any]], plan: str, run: dict[str, Any]) -> None:
    """Keep ``run`` as ``plan``'s if it is the plan's first or fastest: this machine's neighbours slow whole runs."""
    if plan not in runs or run["step_s"] < runs[plan]["step_s"]:
        runs[plan] = run


def _earlier_runs(paths: list[str], model: str, plans: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The measured memory and step time of each of ``plans`` on ``model`` in earlier ``--json`` files: of each
    plan, its fastest run in any of them (as ``--repeats`` keeps the fastest); and the plans that failed in all
    of them, with their error lines."""
    runs: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for path in paths:
        for row in json.loads(Path(path).read_text())["rows"]:
            if row["model"].split()[0] != model:
                continue
            if row.get("measured_mib") is None:  # a failed run
                failed.setdefault(row["plan"], row.get("failed") or "failed")
            else:
                _keep_fastest(runs, row["plan"], {"memory": row["measured_mib"] * MIB, "step_s": row["measured_s"]})
    missing = [plan for plan in plans if plan not in runs and plan not in failed]
    if missing:
        raise SystemExit(f"{', '.join(paths)}: no run of {model} under {', '.join(missing)}")
    return {plan: runs[plan] for plan in plans if plan in runs}, {p: failed[p] for p in plans if p not in runs}


def _pooled(rows: list[dict], cells: list[dict]) -> str:
    """How many of ``rows``' (model, plan) pairs the planner predicted within the tolerances, and how many of
    ``cells`` it chose right in; failed runs are left out, and counted."""
    ran = [row for row in rows if row["measured_mib"] is not None]
    memory = sum(abs(row["memory_error_pct"]) <= 100 * MEMORY_WITHIN for row in ran)
    seconds = sum(abs(row["time_error_pct"]) <= 100 * TIME_WITHIN for row in ran)
    right = sum(cell["right"] for cell in cells)
    over = sum(cell["chosen"] is not None and cell["chosen"] not in cell["fits"] for cell in cells)
    failed = len(rows) - len(ran)
    return (f"memory within ±{MEMORY_WITHIN:.0%} for {memory} of {len(ran)}, time within ±{TIME_WITHIN:.0%} for"
            f" {seconds} of {len(ran)}, choice right in {right} of {len(cells)} cells, over budget in {over}"
            + (f" ({failed} failed run{'s' * (failed > 1)} left out)" if failed else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--plan", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="4x256", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["4x256", "6x512"],
                        help="CharGPT as blocks x width (4x256), or a Hugging Face family:LxW (llama:4x256; "
                        f"families: {', '.join(HF_FAMILIES)})")
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=PLANS)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one 3M-parameter model, 6 plans, 6 steps")
    parser.add_argument("--ranks", type=int, default=2, help="processes per run (one node)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per plan, round-robin; the fastest is kept")
    parser.add_argument("--headroom", type=float, default=None,
                        help="the planner's headroom (default: its own; none on CPU)")
    parser.add_argument("--oracle", metavar="FILE",
                        help="choose each cell from another run's measurements (a --json FILE of the same grid)"
                        " instead of the planner's predictions: the most a perfect predictor of that run gets right"
                        " against this one, the ceiling this machine's run-to-run spread leaves")
    parser.add_argument("--no-margin", action="store_true",
                        help="choose on the predicted peaks alone, without the margin each plan must also fit")
    parser.add_argument("--cells", choices=("gaps", "peaks"), default="gaps",
                        help="budgets between consecutive measured peaks, or at each peak")
    parser.add_argument("--run-timeout", type=int, default=900, help="seconds before a run counts as failed (hung)")
    parser.add_argument("--json", default="", help="also write the rows and cells to this file")
    parser.add_argument("--measured", nargs="*", default=[], help="predict again against the runs of earlier --json "
                        "files (no new runs; the fastest run of each plan across them): a cost-model change judged "
                        "on the same measurements, or more repeats pooled")
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.quick:
        args.models, args.plans, args.steps = ["4x256"], list(QUICK_PLANS), 6
    if args.no_margin:
        from parti_lightning.planner import cost

        # The margin is a share of the heap term: none at all judges the predictions alone.
        cost.HEAP_MARGIN_SHARES = dict.fromkeys(cost.HEAP_MARGIN_SHARES, 0.0)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=170)
    rows, cells = [], []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            family, _, _ = _parse(model)
            predicted, profile, hardware = _predict(args, model, args.plans)
            measured, failed = _earlier_runs(args.measured, model, args.plans) if args.measured else ({}, {})
            # Round-robin repeats, the fastest kept: this machine's neighbours slow whole runs down, not steps.
            for repeat in range(0 if args.measured else args.repeats):
                for plan in args.plans:
                    if plan in failed:  # a plan that failed once is not tried again
                        continue
                    try:
                        run = _run(args, model, plan, Path(tmp, f"{model}-{plan}-{repeat}"))
                    except RunFailed as err:
                        if plan not in measured:  # one good run of a plan is enough to judge it
                            failed[plan] = str(err)
                        print(f"{model} {plan}: failed, {err}", flush=True)
                        continue
                    print(f"{model} {plan}: {run['memory'] / MIB:.0f} MiB, {run['step_s']:.3f} s", flush=True)
                    _keep_fastest(measured, plan, {"memory": run["memory"], "step_s": run["step_s"]})
            ran = [plan for plan in args.plans if plan in measured]  # the cells offer these plans alone
            # The label's first word is the spec: --measured finds a model's rows by it.
            label = f"{model} ({profile.parameter_count / 1e6:.1f}M)"
            oracle = _earlier_runs([args.oracle], model, ran)[0] if args.oracle else None
            model_cells = _cells(label, family, profile, hardware, ran, measured, args.ranks, args.headroom,
                                 args.cells, oracle) if ran else []
            cells.extend(model_cells)
            # The unlimited budget's choice and fastest.
            chosen, fastest = (model_cells[0]["chosen"], model_cells[0]["measured_fastest"]) if ran else (None, None)
            for plan in args.plans:
                p = predicted[plan]
                row = {"model": label, "family": family, "plan": plan, "refusal": p["refusal"],
                       "predicted_mib": p["memory"] / MIB, "predicted_s": p["step_s"]}
                if plan in measured:
                    m = measured[plan]
                    row |= {"measured_mib": m["memory"] / MIB, "measured_s": m["step_s"],
                            "memory_error_pct": 100 * (p["memory"] - m["memory"]) / m["memory"],
                            "time_error_pct": 100 * (p["step_s"] - m["step_s"]) / m["step_s"]}
                else:
                    row |= {"measured_mib": None, "measured_s": None, "memory_error_pct": None,
                            "time_error_pct": None, "failed": failed[plan]}
                rows.append(row | {"chosen": plan == chosen, "measured_fastest": plan == fastest})
    table = Table(title=f"Planner predictions vs {args.ranks}-rank CPU runs (batch {args.batch_size}×{args.block_size}"
                        " per data-parallel rank, fp32 AdamW); memory = peak RSS − RSS before the model")
    for column in ("model", "plan", "pred MiB", "meas MiB", "mem err %", "pred s", "meas s", "time err %",
                   "planner's choice", "measured fastest per sample"):
        table.add_column(column, justify="right")
    for row in rows:
        if row["measured_mib"] is None:
            measured_cells = ["failed", "-", "-", "-"]
        else:
            measured_cells = [f"{row['measured_mib']:.0f}", f"{row['memory_error_pct']:+.0f}",
                              f"{row['measured_s']:.3f}", f"{row['time_error_pct']:+.0f}"]
        table.add_row(row["model"], row["plan"], f"{row['predicted_mib']:.0f}", *measured_cells[:2],
                      f"{row['predicted_s']:.3f}", *measured_cells[2:], "→" if row["chosen"] else "",
                      "✓" if row["measured_fastest"] else "")
    console.print(table)
    # Plain text (no rich markup): error lines hold brackets.
    for row in rows:
        if row["measured_mib"] is None:
            console.print(f"failed: {row['model'].split()[0]} {row['plan']}: {row['failed']}", markup=False)
    for row in rows:
        if row["refusal"]:
            console.print(f"the planner refuses {row['plan']} on {row['model'].split()[0]}: {row['refusal']}",
                          markup=False)
    setting = (f"{args.headroom:.0%} headroom" if args.headroom is not None else "the planner's defaults") + (
        ", no margin" if args.no_margin else "")
    choices = Table(title=f"The planner's choice per budget, {setting} (right: it fits, and is"
                          " within 5% of the measured fastest per sample)")
    for column in ("model", "budget MiB", "plans that fit (measured)", "planner's choice", "measured fastest",
                   "choice / fastest", "right"):
        choices.add_column(column, justify="right")
    for cell in cells:
        ratio = cell["chosen_vs_fastest"]
        choices.add_row(cell["model"], "none" if cell["budget_mib"] is None else f"{cell['budget_mib']:.0f}",
                        str(len(cell["fits"])), str(cell["chosen"]), cell["measured_fastest"],
                        "-" if ratio is None else f"{ratio:.2f}", "✓" if cell["right"] else "✗")
    console.print(choices)
    right = sum(cell["right"] for cell in cells)
    console.print(f"chosen right in {right} of {len(cells)} cells ({100 * right / max(1, len(cells)):.0f}%)")
    for family in dict.fromkeys(row["family"] for row in rows):  # in the order of --models
        console.print(f"{family}: " + _pooled([r for r in rows if r["family"] == family],
                                              [c for c in cells if c["family"] == family]), markup=False)
    console.print("all: " + _pooled(rows, cells), markup=False)
    console.print(f"wall time {(time.perf_counter() - started) / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "cells": cells}, indent=2))


if __name__ == "__main__":
    main()
