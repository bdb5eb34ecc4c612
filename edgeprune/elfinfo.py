"""Memory use read from a linked ELF: flash (what the image stores) and SRAM (what runs in RAM)."""

from dataclasses import dataclass
from pathlib import Path

from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile


@dataclass
class ElfMemory:
    flash_bytes: int          # text + rodata + the .data image
    sram_bytes: int           # data + bss (arena included) + stack
    weights_bytes: int        # const weight arrays
    kernels_bytes: int        # TVM kernel code
    arena_bytes: int          # the model's static arena
    stack_bytes: int          # reserved stack
    symbols: dict[str, int]   # address of every function/object symbol


def read_elf(path: Path, prefix: str) -> ElfMemory:
    """Flash = every loaded section's bytes; SRAM = the writable ones (data, bss, stack)."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        flash = sram = 0
        for s in elf.iter_sections():
            if not s["sh_flags"] & SH_FLAGS.SHF_ALLOC or s.name == ".tbss_space":
                continue
            in_ram = bool(s["sh_flags"] & SH_FLAGS.SHF_WRITE)
            if s["sh_type"] != "SHT_NOBITS":
                flash += s["sh_size"]
            if in_ram:
                sram += s["sh_size"]
        weights = kernels = arena = stack = 0
        symbols = {}
        symtab = elf.get_section_by_name(".symtab")
        for sym in symtab.iter_symbols():
            name, size = sym.name, sym["st_size"]
            symbols[name] = sym["st_value"]
            if name.startswith(f"{prefix}_w") and name[len(prefix) + 2:].isdigit():
                weights += size
            elif name.startswith(f"__tvm_ffi_{prefix}_"):
                kernels += size
            elif name == f"{prefix}_arena":
                arena = size
        if "__stack_top" in symbols and "__stack_limit" in symbols:
            stack = symbols["__stack_top"] - symbols["__stack_limit"]
    return ElfMemory(flash, sram, weights, kernels, arena, stack, symbols)
