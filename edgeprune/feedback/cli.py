"""`edgeprune feedback MODEL --target T --data D --budget latency_ms=5,... --out DIR`.

Searches per-layer pruning ratios and weight word lengths on measured target costs (`deploy
--budget` runs the same search inside the whole pipeline). DIR receives ratios.json (ratios for
`prune --per-layer`; ratios and bits for `deploy --per-layer`), trajectory.json, cost_table.json,
pareto.png, model.pt (float, pruned) and pruning.json.
Exit code 0 when every budget is met as measured, 1 when not (the message names the budget and
the closest point reached).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data import HELP as DATA_HELP
from ..load import MODEL_FILES

STAGE = "feedback"


def register(sub) -> None:
    from ..prune import CRITERIA

    p = sub.add_parser("feedback", help="search per-layer pruning ratios on measured target costs",
                       description=__doc__)
    p.add_argument("model", help=f"{MODEL_FILES}, or a zoo name (trained first, cached)")
    p.add_argument("--target", default="cortex-m7")
    p.add_argument("--data", default="fashion-mnist", help=DATA_HELP)
    p.add_argument("--budget", required=True,
                   help="latency_ms=5,energy_uj=300,flash_kb=256,sram_kb=64 (any subset)")
    p.add_argument("--criterion", default="l1", choices=CRITERIA)
    p.add_argument("--finetune", type=float, default=1.0, help="final fine-tuning epochs")
    p.add_argument("--short-finetune", type=int, default=2000,
                   help="training samples each candidate is fine-tuned on")
    p.add_argument("--distill", type=float, default=0.9, metavar="ALPHA",
                   help="weight of distillation from the unpruned model in every fine-tune "
                        "(0: labels only)")
    p.add_argument("--train-samples", type=int, help="fine-tune on the first N training samples")
    p.add_argument("--train-epochs", type=float, default=None,
                   help="training of a zoo model (default as deploy's)")
    p.add_argument("--workers", type=int, help="parallel candidate evaluations (default 2)")
    p.add_argument("--input-shape", help="static input shape where the model's is not stored")
    p.add_argument("--word-lengths", default=None,
                   help="weight bits a layer may take, e.g. 8,4,2 (default: the target's "
                        "[quant] weight_bits; 8: prune only)")
    p.add_argument("--tap-strides", default=None,
                   help="also let a conv keep 1 in s window taps, e.g. 2,3 (measured like a word "
                        "length; the int8 kernels skip the other taps; default: widths and bits "
                        "only)")
    p.add_argument("--round-to", type=int, help="widths searched are multiples of this many "
                   "channels (default: the target's channel_multiple; 1: any width)")
    p.add_argument("--no-grow-back", dest="grow_back", action="store_false",
                   help="stop at the first widths that meet the budgets (default: grow groups "
                        "back into the slack the steps left, where a short fine-tune says it "
                        "helps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true", help="print the result summary as JSON")
    p.set_defaults(func=run)


def int_list(text: str | None, option: str, example: str,
             stage: str = STAGE) -> tuple[int, ...] | None:
    """An option's comma-separated integers ("8,4,2"), None when not given."""
    from ..errors import EdgepruneError
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise EdgepruneError(f"{option} {text!r}: give {example}", stage=stage) from None


def run(args) -> int:
    import torch

    from .. import data as datasets
    from ..compile import atomic_out_dir
    from ..deploy import parse_budget, trained_zoo_model
    from ..load import is_zoo_name, load_torch, parse_shape, save_torch
    from . import search

    from ..errors import EdgepruneError, check_at_least

    try:
        budget = parse_budget(args.budget)
    except EdgepruneError as e:
        e.stage = STAGE
        raise
    check_at_least((("--finetune", args.finetune, 0), ("--short-finetune", args.short_finetune, 1),
                    ("--train-samples", args.train_samples, 1),
                    ("--train-epochs", args.train_epochs, 0), ("--workers", args.workers, 1),
                    ("--round-to", args.round_to, 1)),
                   stage=STAGE)   # --distill: search() checks it is in [0, 1]
    word_lengths = int_list(args.word_lengths, "--word-lengths", "bits like 8,4,2")
    tap_strides = int_list(args.tap_strides, "--tap-strides", "strides like 2,3") or ()
    log = (lambda *a: None) if args.json else (lambda msg: print(msg, flush=True))
    with atomic_out_dir(args.out, args.force) as tmp:
        data = datasets.load(args.data)
        if is_zoo_name(args.model):
            model, shape = trained_zoo_model(args.model, data, parse_shape(args.input_shape),
                                             args.train_epochs, args.seed, log)
        else:
            model, shape = load_torch(args.model, parse_shape(args.input_shape),
                                      data.num_classes, data_shape=data.input_shape)
        data = datasets.fit_data(shape, data, args.model, STAGE, train_to="fine-tune on")
        example = torch.from_numpy(data.x_train[:shape[0]].reshape(shape))
        result = search(model, example, data, args.target, budget, criterion=args.criterion,
                        seed=args.seed, work_dir=tmp, log=log, workers=args.workers,
                        finetune_epochs=args.finetune, train_samples=args.train_samples,
                        short_finetune_samples=args.short_finetune, progress=not args.json,
                        word_lengths=word_lengths, distill=args.distill,
                        tap_strides=tap_strides, channel_multiple=args.round_to,
                        grow_back=args.grow_back)
        save_torch(result.model, shape, tmp / "model.pt")
        (tmp / "pruning.json").write_text(json.dumps(result.record, indent=1))
    summary = result.summary()
    summary["files"] = {k: str(args.out / k) for k in result.files} | {
        "model.pt": str(args.out / "model.pt"), "pruning.json": str(args.out / "pruning.json")}
    if args.json:
        print(json.dumps(summary))
    else:
        print(result.message)
        print(f"wrote {args.out}/ratios.json (ratios and bits: `edgeprune deploy --per-layer`), "
              "trajectory.json, cost_table.json, pareto.png, model.pt, pruning.json")
    return 0 if result.met else 1
