"""`edgeprune deploy`: load/train → prune → fine-tune → quantize → compile → QEMU check → report.

Exit codes: 0 deployed (and every budget met), 1 deployed but a budget is not met, 2 bad input
(the message names the stage), 3 the target crashed or hung, 130 interrupted.
"""

import json
import time
from pathlib import Path

from ..data import HELP as DATA_HELP
from ..errors import EdgepruneError, check_at_least, read_json_option
from ..load import MODEL_FILES
from ..qemu import TargetFailure


def register(sub) -> None:
    p = sub.add_parser("deploy", help="the whole pipeline: model in, firmware + C library + report out",
                       description=__doc__)
    p.add_argument("--target", default="cortex-m7", help="a target name (edgeprune targets)")
    p.add_argument("--model", help=f"{MODEL_FILES}, or a zoo name (default: resnet8 "
                   "trained on --data)")
    p.add_argument("--data", default="fashion-mnist", help=DATA_HELP)
    p.add_argument("--input-shape", help="static input shape when the model has none, e.g. 1,1,28,28")
    p.add_argument("--out", type=Path, default=Path("build/deploy"), help="output folder")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--criterion", default="l1", help="pruning criterion (see edgeprune prune --help)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed per layer")
    p.add_argument("--per-layer", type=Path,
                   help="JSON file or inline JSON {layer: ratio} (e.g. the feedback loop's)")
    p.add_argument("--budget", help="latency_ms=5,flash_kb=256,sram_kb=64,energy_uj=300: "
                   "search per-layer ratios on the target until every budget holds")
    p.add_argument("--tap-strides", help="with --budget, also let a conv keep 1 in s window "
                                          "taps, e.g. 2,3 (see edgeprune feedback --help)")
    p.add_argument("--round-to", type=int, help="pruned layers keep a multiple of this many "
                   "channels (default: the target's channel_multiple; 1: any width)")
    p.add_argument("--train-epochs", type=float, default=None,
                   help="training of zoo models (cached; default: 1 epoch, more on a dataset "
                        "of under 20,000 samples, to see that many)")
    p.add_argument("--finetune", type=float, default=None,
                   help="fine-tuning epochs after pruning (default: as --train-epochs')")
    p.add_argument("--quant-method", default="auto", choices=("auto", "ptq", "qat", "admm"),
                   help="auto: PTQ, then QAT fine-tuning if PTQ loses accuracy")
    p.add_argument("--mixed-precision", action="store_true",
                   help="per-layer word lengths within the target's, by sensitivity")
    p.add_argument("--calib-samples", type=int, default=512, help="quantization calibration samples")
    p.add_argument("--eval-samples", type=int, default=2000, help="test samples for host accuracy")
    p.add_argument("--target-samples", type=int, default=100, help="test samples run on the target")
    p.add_argument("--port", default="qemu", help="where to profile: qemu (default), "
                   "socket://host:port, or a board's serial port such as /dev/ttyACM0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress, only the summary")
    p.add_argument("--json", action="store_true", help="print report.json only")
    p.set_defaults(func=run)


class StageProgress:
    """A rich progress bar per stage; training stages advance it, others spin."""

    def __init__(self, console):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        self.bar = Progress(TextColumn("{task.description:<10}"), BarColumn(),
                            TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                            console=console, transient=False)
        self.task = None

    def start(self, name):
        if self.task is None:
            self.bar.start()
        self.task = self.bar.add_task(name, total=None)

    def update(self, fraction, loss=None):
        self.bar.update(self.task, total=1.0, completed=fraction)

    def done(self, name, seconds):
        self.bar.update(self.task, total=1.0, completed=1.0)

    def stop(self):
        if self.task is not None:
            self.bar.stop()


def run(args) -> int:
    from rich.console import Console

    from ..deploy import DeployConfig, parse_budget, run_deploy
    from ..feedback.cli import int_list
    from ..load import parse_shape
    from ..report import print_summary

    per_layer = layer_bits = layer_strides = None
    if args.per_layer is not None:
        per_layer = read_json_option(args.per_layer, "--per-layer", "deploy")
        if isinstance(per_layer, dict) and isinstance(per_layer.get("bits"), dict):
            layer_bits = per_layer["bits"]  # the feedback loop's chosen word lengths
        if isinstance(per_layer, dict) and "tap_strides" in per_layer:
            from ..prune.cli import read_tap_strides
            layer_strides = read_tap_strides(args.per_layer)   # its window patterns
        per_layer = per_layer.get("ratios", per_layer)  # the feedback loop's file or a plain map
    if args.tap_strides and not args.budget:
        raise EdgepruneError("--tap-strides is what the --budget search may use: give a --budget "
                             "(a fixed pattern comes with --per-layer's tap_strides)",
                             stage="deploy")
    if not 0 <= args.ratio < 1:
        raise EdgepruneError(f"--ratio must be in [0, 1), got {args.ratio}", stage="deploy")
    check_at_least((("--finetune", args.finetune, 0), ("--train-epochs", args.train_epochs, 0),
                    ("--calib-samples", args.calib_samples, 1),
                    ("--eval-samples", args.eval_samples, 1),
                    ("--target-samples", args.target_samples, 1),
                    ("--round-to", args.round_to, 1)), stage="deploy")
    cfg = DeployConfig(out=args.out, target=args.target, model=args.model, data=args.data,
                       input_shape=parse_shape(args.input_shape), train_epochs=args.train_epochs,
                       criterion=args.criterion, ratio=args.ratio, per_layer=per_layer,
                       layer_bits=layer_bits, layer_strides=layer_strides,
                       tap_strides=int_list(args.tap_strides, "--tap-strides",
                                            "strides like 2,3", "deploy") or (),
                       round_to=args.round_to,
                       budget=parse_budget(args.budget), finetune_epochs=args.finetune,
                       quant_method=args.quant_method, mixed_precision=args.mixed_precision,
                       calib_samples=args.calib_samples, eval_samples=args.eval_samples,
                       target_samples=args.target_samples, port=args.port, seed=args.seed, force=args.force)
    quiet = args.quiet or args.json
    console = Console(stderr=True)
    progress = None if quiet else StageProgress(console)
    log = (lambda *a: None) if quiet else (lambda msg: console.print(msg))
    t0 = time.perf_counter()
    try:
        report = run_deploy(cfg, log=log, progress=progress)
    except TargetFailure as e:
        console.print(f"edgeprune deploy: target failure: {e}")
        return 3
    finally:
        if progress is not None:
            progress.stop()
    if args.json:
        print(json.dumps(report))
    else:
        print_summary(report, Console())
        print(f"deployed to {cfg.out}/ in {time.perf_counter() - t0:.0f} s: firmware.elf, "
              "firmware.bin, c_library/, model.onnx, qmodel/, report.json, report.html")
    return 0 if report["met"] else 1
