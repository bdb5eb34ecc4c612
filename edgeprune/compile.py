"""The compile stage: model → TVM kernels + AOT C library + firmware for a target's QEMU board."""

import contextlib
import json
import os
import shutil
from pathlib import Path

from .errors import EdgepruneError
from .targets import Target, load_target, target_ref

BUILD_FILE = "build.json"
DEPLOY_BUILD = "build"        # where `deploy` compiles, inside its output folder


def refuse_to_overwrite(out: Path, force: bool, stage: str | None = None) -> None:
    """An error unless `out` is free (missing or an empty folder) or `force` is given."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise EdgepruneError(f"{out} exists (a file, or a folder that is not empty); pass --force "
                             "to replace it", stage=stage)


def prepare_out_dir(out: Path, force: bool) -> Path:
    """A fresh temporary sibling of `out`; `finish_out_dir` moves it into place when all went well."""
    refuse_to_overwrite(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def finish_out_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)


@contextlib.contextmanager
def atomic_out_dir(out: Path | str, force: bool):
    """Write into a temporary sibling of `out`, renamed into place only if the block succeeds;
    on any error nothing is left behind and an existing `out` is untouched."""
    out = Path(out)
    tmp = prepare_out_dir(out, force)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finish_out_dir(tmp, out)


def is_quantized_dir(spec: str) -> bool:
    return Path(spec).is_dir() and (Path(spec) / "qmodel.json").exists()


def check_fits(target: Target, weights_bytes: int, arena_bytes: int | None, origin: str) -> None:
    if weights_bytes > target.flash_bytes:
        raise EdgepruneError(f"{origin}: the weights take {weights_bytes} B but {target.name} "
                             f"({target.chip['part']}) has {target.flash_bytes} B of flash")
    if arena_bytes is not None and arena_bytes > target.sram_bytes:
        raise EdgepruneError(f"{origin}: the activation arena needs {arena_bytes} B but {target.name} "
                             f"({target.chip['part']}) has {target.sram_bytes} B of SRAM")


def compile_model(spec: str | Path, target_name: str, out: Path | str,
                  input_shape: tuple[int, ...] | None = None,
                  prefix: str = "model", force: bool = False, log=print,
                  check_chip: bool = True, firmware: bool = True) -> dict:
    """Lower `spec` with TVM into a C library and firmware in `out`. check_chip=False builds a
    model larger than the chip's flash or SRAM all the same (QEMU's board has room: the feedback
    search measures such models on its way to a budget). firmware=False writes the library only
    (the search measures with the profiling firmware, which it builds from the library)."""
    from . import frontend
    from .elfinfo import read_elf
    from .emit import write_library
    from .firmware import build_firmware
    from .lower import lower_relax
    from .plan import plan_model, reorder_for_memory

    target, spec = load_target(target_name), str(spec)
    if not is_quantized_dir(spec) and is_quantized_dir(str(Path(spec) / "qmodel")):
        spec = str(Path(spec) / "qmodel")   # a deploy or compile output: its integer model
    with atomic_out_dir(out, force) as tmp:
        if is_quantized_dir(spec):
            from .quantize.qmodel import load as load_qmodel
            from .quantize.to_relax import to_relax
            qmodel = load_qmodel(Path(spec))
            kind, mod = "int", to_relax(qmodel)
            quant_note = quantization_note(qmodel)
            shutil.copytree(spec, tmp / "qmodel")
        else:
            model = frontend.to_onnx(spec, input_shape)
            kind, quant_note = "float", ""
            if check_chip:
                check_fits(target, sum(_init_bytes(i) for i in model.graph.initializer), None,
                           spec)
            import onnx
            onnx.save(model, str(tmp / "model.onnx"))
            from .lower import import_onnx
            mod = import_onnx(model, spec)
        log(f"lowering with TVM ({kind} model)")
        from .kernels.tune import tiles_for
        with tiles_for(target):  # the tile tuner's choices for this target, if it ran
            lowered = lower_relax(mod, prefix, features=target.chip.get("features", ()))
        saved = reorder_for_memory(lowered)  # branches: the call order with the lowest peak
        if saved:
            log(f"call order changed for memory: peak -{saved} bytes")
        plan = plan_model(lowered)
        if check_chip:
            check_fits(target, lowered.weights_bytes, plan.arena_bytes, spec)
        manifest = write_library(lowered, plan, tmp / "c_library", quant_note)
        build = {"target": target_ref(target), "model": spec, "kind": kind, **manifest,
                 **({} if check_chip else {"beyond_chip": True})}  # linked for the board's memory
        if firmware:
            log(f"cross-compiling for {target.name} ({target.toolchain['cc']})")
            elf = build_firmware(target, tmp / "c_library", manifest, tmp / "firmware",
                                 chip=check_chip)
            build.update(firmware="firmware/firmware.elf",
                         memory=memory_summary(read_elf(elf, prefix)))
        (tmp / BUILD_FILE).write_text(json.dumps(build, indent=2))
        return build


def memory_summary(mem) -> dict:
    return {"flash_bytes": mem.flash_bytes, "sram_bytes": mem.sram_bytes,
            "weights_bytes": mem.weights_bytes, "kernels_bytes": mem.kernels_bytes,
            "arena_bytes": mem.arena_bytes, "stack_bytes": mem.stack_bytes}


def retarget_build(build_dir: Path, target_name: str, out: Path, force: bool = False) -> dict:
    """The same generated C library cross-compiled for another target (it is target-independent:
    the kernels pick DSP/portable code with the compiler's own macros), without lowering again."""
    from .elfinfo import read_elf
    from .firmware import build_firmware

    build = load_build(build_dir)
    target = load_target(target_name)
    check_fits(target, build["memory"]["weights_bytes"], build["arena_bytes"], str(build_dir))
    with atomic_out_dir(out, force) as tmp:
        for item in build_dir.iterdir():
            if item.name not in ("firmware", BUILD_FILE):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        elf = build_firmware(target, tmp / "c_library", build, tmp / "firmware")
        build = {**build, "target": target_ref(target),
                 "memory": memory_summary(read_elf(elf, build["prefix"]))}
        (tmp / BUILD_FILE).write_text(json.dumps(build, indent=2))
        return build


def quantization_note(qmodel) -> str:
    """How a user turns real values into the library's integers and back (for its README)."""
    i = qmodel.input_info
    means = [f"`y = {o.scale!r} * (q - {o.zero_point})`"
             for o in (qmodel.tensors[n] for n in qmodel.outputs)]
    said = (f"the output means {means[0]}" if len(means) == 1 else
            "the outputs mean " + ", ".join(f"{m} (output{k})" for k, m in enumerate(means)))
    return ("The model is integer-only. Quantize the input as "
            f"`q = clamp(floor(x / {i.scale!r} + 0.5) + {i.zero_point}, {i.qmin}, {i.qmax})`; "
            f"{said}.")


def _init_bytes(init) -> int:
    import numpy as np
    from onnx import helper

    n = int(np.prod(init.dims)) if init.dims else 1
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize


def build_folder(path: Path) -> Path:
    """A `compile` output folder as given, or a `deploy` output's (its build/)."""
    path = Path(path)
    if not (path / BUILD_FILE).exists() and (path / DEPLOY_BUILD / BUILD_FILE).exists():
        return path / DEPLOY_BUILD
    return path


def load_build(build_dir: Path) -> dict:
    f = build_dir / BUILD_FILE
    if not f.exists():
        raise EdgepruneError(f"{build_dir} is not an edgeprune build folder (no {BUILD_FILE}); "
                             "make one with `edgeprune compile` (or `edgeprune deploy`)")
    return json.loads(f.read_text())
