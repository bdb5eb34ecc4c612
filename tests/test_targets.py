"""Every target (issue 6): one float and one int8 zoo model cross-compiled for each target's
toolchain and run in its QEMU (system or user mode) with outputs checked against the host.

The TVM lowering is done once per model (for cortex-m7); every other target cross-compiles the
same generated C library (`retarget_build`), so the test stays fast.
"""

import re
import subprocess

import pytest

from edgeprune.compile import compile_model, retarget_build
from edgeprune.errors import EdgepruneError
from edgeprune.firmware import compiler_flags
from edgeprune.simulate import simulate
from edgeprune.targets import FIRMWARE_DIR, load_target, target_names

TARGETS = target_names()
MISSION = {"cortex-m4", "cortex-m7", "cortex-m33", "cortex-m55", "cortex-a53", "cortex-a72",
           "riscv32", "riscv64"}


@pytest.fixture(scope="session")
def reference_builds(build_root, zoo_build):
    """cortex-m7 builds of the zoo 'cnn': float, and int8 (PTQ on 32 Fashion-MNIST images)."""
    from edgeprune import data, models
    from edgeprune.quantize import ptq

    fmnist = data.load("fashion-mnist")
    model, shape = models.build("cnn")
    qdir = ptq.quantize_ptq(model.eval(), shape, fmnist.x_train[:32]).save(build_root / "cnn-int8-q")
    int8 = build_root / "cnn-int8-cortex-m7"
    compile_model(str(qdir), "cortex-m7", int8, log=lambda *a: None)
    # two real test images, given explicitly: simulate would otherwise reload the data set each time
    return {"float": zoo_build("cnn"), "int8": int8, "inputs": fmnist.x_test[:2]}


def test_mission_targets_exist_with_chip_facts():
    assert MISSION <= set(TARGETS)
    for name in TARGETS:
        t = load_target(name)
        assert t.chip["part"] and t.chip["source"] and t.power["source"]
        assert t.power_mw > 0 and t.chip["clock_hz"] > 0


def test_targets_answer_to_the_names_of_their_isa():
    # the brief's names for the targets: Cortex-A (aarch64), RISC-V (rv32/rv64), M4/M7/M55
    for alias, name in [("aarch64", "cortex-a53"), ("rv32", "riscv32"), ("RV64", "riscv64"),
                        ("m7", "cortex-m7"), ("Cortex-M55", "cortex-m55")]:
        assert load_target(alias).name == name
    with pytest.raises(EdgepruneError, match="unknown target 'rv128'.*also: .*aarch64"):
        load_target("rv128")


def test_a_target_names_the_channel_multiple_its_kernels_prefer(tmp_path):
    # every target measured (bench/results/widths.json): odd widths cost more per channel
    assert {load_target(n).channel_multiple for n in TARGETS} == {2}
    text = (load_target("cortex-m7").path).read_text()
    for bad in ("0", "2.5", "true"):
        path = tmp_path / "cortex-m7.toml"
        path.write_text(text.replace("channel_multiple = 2", f"channel_multiple = {bad}"))
        with pytest.raises(EdgepruneError, match="channel_multiple must be a positive integer"):
            load_target(str(path))
    path.write_text(text.replace("channel_multiple = 2\n", ""))
    assert load_target(str(path)).channel_multiple == 1


@pytest.mark.parametrize("board", sorted({load_target(n).board["template"] for n in TARGETS}))
def test_every_board_implements_board_h(board, tmp_path):
    """Each board folder defines every function common/board.h declares (compiled, then nm)."""
    declared = set(re.findall(r"\b(board_\w+)\s*\(", (FIRMWARE_DIR / "common" / "board.h").read_text()))
    t = next(load_target(n) for n in TARGETS if load_target(n).board["template"] == board)
    cc, q = t.toolchain["cc"], t.qemu
    defined = set()
    for src in sorted((FIRMWARE_DIR / board).glob("*.[cS]")):
        obj = tmp_path / (src.name + ".o")
        libc = ["--specs=picolibc.specs"] if t.toolchain.get("libc", "picolibc") == "picolibc" else []
        subprocess.run([cc, *compiler_flags(t), *libc, "-c", f"-I{FIRMWARE_DIR / 'common'}",
                        f"-DEP_UART_BASE={q.get('uart_base', 0)}u", f"-DEP_IO_ORIGIN={q['io_origin']}u",
                        f"-DEP_IO_SIZE={q['io_size']}u", f"-DEP_STACK_BYTES={t.board['stack_bytes']}",
                        str(src), "-o", str(obj)], check=True)
        nm = subprocess.run([cc.replace("gcc", "nm"), "--defined-only", str(obj)],
                            capture_output=True, text=True, check=True).stdout
        defined |= {line.split()[-1] for line in nm.splitlines() if " T " in line}
    assert declared and declared <= defined, f"{board} lacks {sorted(declared - defined)}"


@pytest.fixture(scope="session")
def target_build(reference_builds, build_root):
    """The reference build of `kind` cross-compiled for `target` (once per session)."""
    cache = {}

    def get(kind: str, target: str):
        if target == "cortex-m7":
            return reference_builds[kind]
        if (kind, target) not in cache:
            out = build_root / f"cnn-{kind}-{target}"
            build = retarget_build(reference_builds[kind], target, out, force=True)
            assert build["target"] == target
            cache[kind, target] = out
        return cache[kind, target]

    return get


@pytest.mark.parametrize("kind", ["float", "int8"])
@pytest.mark.parametrize("target", TARGETS)
def test_zoo_model_runs_on_target(target, kind, target_build, reference_builds):
    result, _ = simulate(target_build(kind, target), inputs=reference_builds["inputs"])
    assert result["target"] == target and result["samples"] == 2
    assert result["outputs_match"], result
    if kind == "int8":
        assert result["mismatches"] == 0
    else:
        assert result["rel_err"] <= 1e-4
    assert result["instructions"] > 10_000
    assert len(result["layers"]) == len([l for l in result["layers"] if l["instructions"] > 0])
    assert 0 < result["flash_bytes"] and 0 < result["sram_bytes"]
    assert 0 < result["stack_used_bytes"] <= load_target(target).board["stack_bytes"]


@pytest.mark.parametrize("target", ["cortex-a53", "riscv32"])
def test_profile_over_the_serial_protocol(target, target_build, reference_builds):
    """The host paths new with these boards: user-mode QEMU's stdin/stdout on a TCP socket, and
    RISC-V's mcycle, which counts exact instructions under -icount."""
    from edgeprune.profile import profile

    build_dir = target_build("int8", target)
    report = profile(build_dir, inputs=reference_builds["inputs"][:1])
    sim, _ = simulate(build_dir, inputs=reference_builds["inputs"][:1])
    assert report["check"]["outputs_match"] and report["deterministic"]
    assert report["latency"]["instructions"] == pytest.approx(sim["instructions"], rel=1e-3)
    if target == "riscv32":
        assert report["latency"]["source"] == "mcycle"
        assert report["latency"]["cycles"] == pytest.approx(report["latency"]["instructions"], rel=1e-3)


@pytest.mark.parametrize("target, old, new, message", [
    ("cortex-m55", "uart_base = 0x59303000", 'uart_base = "uart0"', "[qemu] uart_base"),
    ("cortex-a53", "io_origin = 0x70000000", "", "[qemu] io_origin"),
    ("riscv64", 'libc = "picolibc"', 'libc = "newlib"', "libc = 'newlib' is not supported"),
])
def test_bad_target_file_names_the_field(tmp_path, target, old, new, message):
    from edgeprune.errors import EdgepruneError
    from edgeprune.targets import TARGETS_DIR

    text = (TARGETS_DIR / f"{target}.toml").read_text()
    assert old in text
    bad = tmp_path / f"{target}.toml"
    bad.write_text(text.replace(old, new))
    with pytest.raises(EdgepruneError, match=re.escape(message)):
        load_target(str(bad))
