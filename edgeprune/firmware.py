"""Cross-compile a generated C library with a board's support files into firmware."""

import subprocess
from pathlib import Path

from .errors import EdgepruneError
from .targets import FIRMWARE_DIR, Target

IO_ALIGN = 16


def _align(n: int) -> int:
    return -(-n // IO_ALIGN) * IO_ALIGN


def io_layout(tensors: list[dict]) -> tuple[list[int], int]:
    """Byte offsets of each tensor in one packed sample, and the sample size (16-B aligned parts)."""
    offsets, pos = [], 0
    for t in tensors:
        offsets.append(pos)
        pos += _align(t["bytes"])
    return offsets, pos


def write_glue(manifest: dict, out_dir: Path) -> None:
    """ep_glue.{h,c}: the harness's one entry point, `ep_model_run(bytes in, bytes out)`."""
    from .emit import c_type

    p = manifest["prefix"]
    in_off, in_bytes = io_layout(manifest["inputs"])
    out_off, out_bytes = io_layout(manifest["outputs"])
    (out_dir / "ep_glue.h").write_text(
        "#include <stdint.h>\n"
        f"#define EP_IN_BYTES {in_bytes}u\n#define EP_OUT_BYTES {out_bytes}u\n"
        "int ep_model_run(const uint8_t *in, uint8_t *out);\n")
    args = [f"(const {c_type(t['dtype'])} *)(in + {o})" for t, o in zip(manifest["inputs"], in_off)]
    args += [f"({c_type(t['dtype'])} *)(out + {o})" for t, o in zip(manifest["outputs"], out_off)]
    (out_dir / "ep_glue.c").write_text(
        '#include "ep_glue.h"\n#include "model.h"\n'
        "int ep_model_run(const uint8_t *in, uint8_t *out) {\n"
        f"  return {p}_run({', '.join(args)});\n}}\n")


def compiler_flags(target: Target) -> list[str]:
    tc = target.toolchain
    return [*tc["cflags"], *tc["opt"].split(), "-ffunction-sections", "-fdata-sections",
            "-std=gnu11", "-Wall", "-Wno-unused-variable", "-Wno-unused-parameter",
            "-Wno-unused-but-set-variable"]


def memory_limits(target: Target, chip: bool = True) -> tuple[int, int]:
    """(flash, RAM) bytes the firmware is linked into: the chip's, or with chip=False the QEMU
    board's (room to measure a model that does not fit the chip yet)."""
    q = target.qemu
    if not chip:
        return q["flash_size"], q["ram_size"]
    return min(q["flash_size"], target.flash_bytes), min(q["ram_size"], target.sram_bytes)


def link_flags(target: Target, out_dir: Path, chip: bool = True) -> list[str]:
    """The C library and memory layout: picolibc on the board's linker script (bare metal, sizes
    from the target file), or a static glibc binary (Linux user mode, the kernel lays it out)."""
    if target.toolchain.get("libc", "picolibc") == "glibc":
        return ["-static", "-Wl,--gc-sections", f"-Wl,-Map={out_dir / 'firmware.map'}", "-lm"]
    q = target.qemu
    flash, ram = memory_limits(target, chip)
    return ["--specs=picolibc.specs", "-nostartfiles", f"-T{target.board_dir / 'link.ld'}",
            "-Wl,--gc-sections", f"-Wl,-Map={out_dir / 'firmware.map'}",
            f"-Wl,--defsym=__flash_origin={q['flash_origin']},--defsym=__flash_size={flash}",
            f"-Wl,--defsym=__ram_origin={q['ram_origin']},--defsym=__ram_size={ram}",
            f"-Wl,--defsym=__stack_size={target.board['stack_bytes']}"]


def build_firmware(target: Target, lib_dir: Path, manifest: dict, out_dir: Path,
                   harness: str = "sim_main.c", defines: dict[str, str] | None = None,
                   chip: bool = True) -> Path:
    """Compile and link one firmware ELF for `target`'s QEMU board; returns its path. chip:
    within the chip's flash and SRAM (else the board's, see memory_limits)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_glue(manifest, out_dir)
    board, common = target.board_dir, FIRMWARE_DIR / "common"
    q = target.qemu
    defs = {"EP_PROFILE": "1", "EP_IO_ORIGIN": hex(q["io_origin"]) + "u",
            "EP_IO_SIZE": hex(q["io_size"]) + "u", "EP_STACK_BYTES": str(target.board["stack_bytes"]),
            **({"EP_UART_BASE": hex(q["uart_base"]) + "u"} if "uart_base" in q else {}),
            **(defines or {})}
    sources = sorted(lib_dir.glob("*.c")) + [out_dir / "ep_glue.c", common / harness,
                                             common / "markers.c"] + sorted(board.glob("*.[cS]"))
    elf = out_dir / "firmware.elf"
    cmd = [target.toolchain["cc"], *compiler_flags(target),
           *[f"-D{k}={v}" for k, v in defs.items()],
           f"-I{lib_dir}", f"-I{lib_dir / 'include'}", f"-I{out_dir}", f"-I{common}", f"-I{board}",
           *map(str, sources), *link_flags(target, out_dir, chip), "-o", str(elf)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise EdgepruneError(f"cross compiler {target.toolchain['cc']} is not installed (run make setup)")
    if r.returncode != 0:
        overflow = [l for l in r.stderr.splitlines() if "overflowed by" in l]
        if overflow:
            flash, ram = memory_limits(target, chip)
            raise EdgepruneError(f"the firmware does not fit {target.name} (flash {flash} B, "
                                 f"SRAM {ram} B): {overflow[0].strip()}")
        raise EdgepruneError(f"cross compilation for {target.name} failed:\n{r.stderr[-4000:]}")
    return elf

