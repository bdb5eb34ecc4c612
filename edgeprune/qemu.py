"""Run firmware in QEMU and count its instructions exactly (TCG plugin at marker functions)."""

import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgepruneError
from .qemu_plugin import plugin_path
from .targets import Target

EXIT_FAULT = 126


class TargetFailure(EdgepruneError):
    """The firmware crashed, hung or reported an error (CLI exit code 3)."""


@dataclass
class QemuRun:
    returncode: int
    stdout: str
    stderr: str
    marks: list[tuple[int, int]] = field(default_factory=list)  # (address, instructions so far)
    total_instructions: int = 0


def qemu_command(target: Target, elf: Path, serial: str = "stdio") -> list[str]:
    q = target.qemu
    if user_mode(target):  # a static Linux binary under qemu-<arch>: no machine, no UART
        return [q["binary"], *q.get("args", []), str(elf)]
    return [q["binary"], "-M", q["machine"], *q.get("args", []), "-display", "none",
            "-monitor", "none", "-serial", serial, "-kernel", str(elf)]


def start_qemu_tcp(target: Target, elf: Path, connect, plugin_args: str | None = None,
                   tries: int = 5):
    """Start QEMU with UART0 as a TCP server on a free loopback port; (process, connect(port)).

    `wait=on`: the guest starts only when the host connects, so nothing it sends is lost.
    `connect(port)` opens the host's end (raising OSError-like errors until QEMU listens).
    `plugin_args`: the icount plugin's arguments (out=..,mark=..). Stop it with `stop_qemu`.
    """
    import socket
    if user_mode(target):
        return _start_user_tcp(target, elf, connect, plugin_args)
    for _ in range(tries):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = qemu_command(target, elf, f"tcp:127.0.0.1:{port},server=on,wait=on,nodelay=on")
        if plugin_args:
            cmd += ["-plugin", f"{plugin_path()},{plugin_args}"]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise EdgepruneError(f"{cmd[0]} is not installed (run make setup)")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                return proc, connect(port)
            except Exception:
                time.sleep(0.02)
        err = stop_qemu(proc, timeout=1)
        if "Address already in use" not in err:
            raise EdgepruneError(f"QEMU did not open its serial port on 127.0.0.1:{port}: "
                                 f"{err[-300:] or 'no message'}")
    raise EdgepruneError(f"QEMU found no free loopback port in {tries} tries")


def _start_user_tcp(target: Target, elf: Path, connect, plugin_args: str | None):
    """User mode has no UART: the binary's stdin/stdout become one end of a loopback TCP
    connection whose other end is `connect(port)`, so the host side is the same as on a board."""
    import socket
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        link = connect(server.getsockname()[1])
        conn, _ = server.accept()
    with conn:
        cmd = qemu_command(target, elf)
        if plugin_args:  # options go before the program in user mode
            cmd[-1:-1] = ["-plugin", f"{plugin_path()},{plugin_args}"]
        try:
            proc = subprocess.Popen(cmd, stdin=conn, stdout=conn, stderr=subprocess.PIPE)
        except FileNotFoundError:
            link.close()
            raise EdgepruneError(f"{cmd[0]} is not installed (run make setup)")
    return proc, link


def stop_qemu(proc: subprocess.Popen, timeout: float = 5) -> str:
    """Wait for QEMU to exit (kill it by PID after `timeout`); returns its stderr."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return (err or b"").decode(errors="replace")


def user_mode(target: Target) -> bool:
    """Cortex-A targets run as static Linux binaries in QEMU user mode ([qemu] machine = "user")."""
    return target.qemu["machine"] == "user"


def io_options(target: Target, io_file: Path) -> list[str]:
    """Preload the test inputs at the io region: `-device loader` on a board; in user mode the
    board code maps the file there itself (linux-user/board.c reads EP_IO_FILE)."""
    if user_mode(target):
        return ["-E", f"EP_IO_FILE={io_file}"]
    return ["-device", f"loader,file={io_file},addr={target.qemu['io_origin']:#x},force-raw=on"]


def run_firmware(target: Target, elf: Path, io_blob: bytes | None = None, timeout: float = 120,
                 marks: list[int] | None = None) -> QemuRun:
    with tempfile.TemporaryDirectory(prefix="edgeprune-qemu-") as tmp:
        cmd = qemu_command(target, elf)
        if io_blob is not None:
            if len(io_blob) > target.qemu["io_size"]:
                raise EdgepruneError(f"{len(io_blob)} B of test inputs exceed the io region "
                                     f"({target.qemu['io_size']} B); use fewer samples")
            io_file = Path(tmp) / "io.bin"
            io_file.write_bytes(io_blob)
            cmd += io_options(target, io_file)
        log = Path(tmp) / "icount.txt"
        if marks is not None:
            args = ",".join([f"out={log}"] + [f"mark={m:#x}" for m in marks])
            cmd += ["-plugin", f"{plugin_path()},{args}"]
        if user_mode(target):  # qemu-<arch> reads its options before the program
            cmd.remove(str(elf))
            cmd.append(str(elf))
        try:
            r = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise EdgepruneError(f"{cmd[0]} is not installed (run make setup)")
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace")
            raise TargetFailure(f"the firmware hung: no exit within {timeout:.0f} s "
                                f"(last output: {out[-200:]!r})")
        run = QemuRun(r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"))
        if marks is not None and log.exists():
            for line in log.read_text().splitlines():
                a, b = line.split()
                if a == "total":
                    run.total_instructions = int(b)
                else:
                    run.marks.append((int(a, 16), int(b)))
    if "FAULT" in run.stdout or run.returncode in (EXIT_FAULT, 127):
        fault = next((l for l in run.stdout.splitlines() if l.startswith("FAULT")), "FAULT")
        raise TargetFailure(f"the firmware crashed on {target.name}: {fault}")
    if run.returncode == 134:
        raise TargetFailure(f"QEMU aborted (lockup) on {target.name}: {run.stderr[-300:]}")
    return run
