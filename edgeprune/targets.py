"""Targets are data: one TOML file per target in targets/. Code asks the Target, never its name."""

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgepruneError

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
FIRMWARE_DIR = Path(__file__).resolve().parent.parent / "firmware_templates"

# (table, key, type) every target must define; read once here so a typo fails at load time.
_REQUIRED = [
    ("", "name", str), ("", "description", str),
    ("chip", "part", str), ("chip", "core", str), ("chip", "clock_hz", int),
    ("chip", "flash_bytes", int), ("chip", "sram_bytes", int), ("chip", "source", str),
    ("toolchain", "cc", str), ("toolchain", "cflags", list), ("toolchain", "opt", str),
    ("board", "template", str), ("board", "stack_bytes", int),
    ("qemu", "binary", str), ("qemu", "machine", str),
    ("counter", "board", str), ("counter", "qemu", str),
    ("quant", "weight_bits", list), ("quant", "activation_bits", list),
    ("power", "run_current_ma", float), ("power", "supply_v", float), ("power", "source", str),
]
# [qemu] addresses a bare-metal board needs; user mode ([qemu] machine = "user", a static Linux
# binary under qemu-<arch>) needs only the io region its board code maps the inputs to.
_QEMU_BOARD = ["flash_origin", "flash_size", "ram_origin", "ram_size", "io_origin", "io_size",
               "uart_base"]
_QEMU_USER = ["io_origin", "io_size"]
LIBCS = ("picolibc", "glibc")


@dataclass
class Target:
    name: str
    description: str
    chip: dict
    toolchain: dict
    board: dict
    qemu: dict
    counter: dict
    quant: dict
    power: dict
    path: Path = field(default=Path())
    aliases: list = field(default_factory=list)

    @property
    def flash_bytes(self) -> int:
        return self.chip["flash_bytes"]

    @property
    def sram_bytes(self) -> int:
        return self.chip["sram_bytes"]

    @property
    def channel_multiple(self) -> int:
        """What pruned widths are rounded to a multiple of ([quant] channel_multiple; 1: any):
        the kernels' channel blocking makes other widths cost more per channel."""
        return self.quant.get("channel_multiple", 1)

    @property
    def board_dir(self) -> Path:
        return FIRMWARE_DIR / self.board["template"]

    @property
    def power_mw(self) -> float:
        p = self.power
        return p["run_current_ma"] * p["supply_v"] * p.get("flash_wait_factor", 1.0)


def target_names() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def _alias_paths() -> dict[str, Path]:
    """Other names a target answers to (its file's `aliases`: "aarch64", "rv32", "m7")."""
    paths = {}
    for path in TARGETS_DIR.glob("*.toml"):
        try:
            aliases = tomllib.loads(path.read_text()).get("aliases", [])
        except tomllib.TOMLDecodeError:
            continue   # load_target names the broken file when it is asked for
        paths.update({a.lower(): path for a in aliases})
    return paths


def target_ref(target: Target) -> str:
    """What load_target takes back: the name of a target in targets/, else its file's path."""
    return target.name if Path(target.path).resolve().parent == TARGETS_DIR else str(target.path)


def load_target(name_or_path: str) -> Target:
    path = Path(name_or_path)
    if path.suffix != ".toml":
        name = name_or_path.lower()
        path = TARGETS_DIR / f"{name}.toml"
        if not path.exists():
            path = _alias_paths().get(name, path)
    if not path.exists():
        aliases = ", ".join(sorted(_alias_paths()))
        raise EdgepruneError(f"unknown target '{name_or_path}'; known: {', '.join(target_names())}"
                             f" (also: {aliases})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise EdgepruneError(f"{path}: not valid TOML: {e}")
    for table, key, typ in _REQUIRED:
        section = raw if not table else raw.get(table)
        where = f"[{table}] {key}" if table else key
        if not isinstance(section, dict) or key not in section:
            raise EdgepruneError(f"{path}: missing field {where}")
        value = section[key]
        if typ is float and isinstance(value, int):
            section[key] = value = float(value)
        if not isinstance(value, typ):
            raise EdgepruneError(f"{path}: field {where} must be {typ.__name__}, "
                                 f"got {type(value).__name__} {value!r}")
    q = raw["qemu"]
    for key in _QEMU_USER if q["machine"] == "user" else _QEMU_BOARD:
        if not isinstance(q.get(key), int):
            raise EdgepruneError(f"{path}: [qemu] {key} must be an integer address/size "
                                 f"(got {q.get(key)!r})")
    multiple = raw["quant"].get("channel_multiple", 1)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise EdgepruneError(f"{path}: [quant] channel_multiple must be a positive integer "
                             f"(got {multiple!r})")
    libc = raw["toolchain"].get("libc", "picolibc")
    if libc not in LIBCS:
        raise EdgepruneError(f"{path}: [toolchain] libc = '{libc}' is not supported ({', '.join(LIBCS)})")
    t = Target(name=raw["name"], description=raw["description"],
               **{k: raw[k] for k in ("chip", "toolchain", "board", "qemu", "counter", "quant", "power")},
               path=path, aliases=raw.get("aliases", []))
    if t.name != path.stem:
        raise EdgepruneError(f"{path}: name = '{t.name}' does not match the file name '{path.stem}'")
    if not t.board_dir.is_dir():
        raise EdgepruneError(f"{path}: [board] template '{t.board['template']}' has no folder "
                             f"{t.board_dir}")
    return t
