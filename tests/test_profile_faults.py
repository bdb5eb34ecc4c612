"""Profiling link faults that need more than flipped bytes: truncated frames (bytes lost on the
wire, both directions) and a real device reset (QEMU's monitor `system_reset` mid-inference).
Real QEMU, its UART on a real TCP socket, pyserial on the host."""

import socket
import subprocess
import time

import pytest

from edgeprune import protocol as P
from edgeprune.compile import load_build
from edgeprune.profile import profile, profile_firmware
from edgeprune.qemu import qemu_command
from edgeprune.simulate import default_inputs
from edgeprune.targets import load_target
from tcp_proxy import ManInTheMiddle, profile_through


@pytest.fixture(scope="module")
def cnn(zoo_build):
    return zoo_build("cnn")


@pytest.fixture(scope="module")
def x():
    return default_inputs((1, 1, 28, 28), 1)[0]


class FramePump(ManInTheMiddle):
    """A TCP man in the middle that forwards whole frames and can lose the tail of some.

    `cut_down` / `cut_up`: indices of frames (device->host / host->device, counted from 0) of
    which only the first half is forwarded. `on_up(type)` is called after each host request is passed on.
    """

    def __init__(self, cut_down=(), cut_up=(), on_up=None):
        super().__init__()
        self.cut = {True: set(cut_down), False: set(cut_up)}
        self.on_up = on_up

    def _pump(self, src, dst, down):
        buf, sent = bytearray(), 0
        try:
            while data := src.recv(4096):
                buf += data
                while buf:
                    if buf[0] != P.START:  # not a frame (the host's fill bytes): pass it on
                        dst.sendall(bytes(buf[:1]))
                        del buf[:1]
                        continue
                    if len(buf) < P.HEADER or len(buf) < P.HEADER + buf[3] + 256 * buf[4] + 2:
                        break
                    size = P.HEADER + buf[3] + 256 * buf[4] + 2
                    wire, type_ = bytes(buf[:size]), buf[1]
                    del buf[:size]
                    if sent in self.cut[down]:
                        wire = wire[:len(wire) // 2]
                    dst.sendall(wire)
                    if not down and self.on_up:
                        self.on_up(type_)
                    sent += 1
        except OSError:
            pass


def test_truncated_frames_both_ways_are_retried_to_the_same_numbers(cnn, x):
    # Frame 0 down is the boot frame; halve two upload requests and two upload answers.
    clean = profile_through(cnn, FramePump(), x)
    cut = profile_through(cnn, FramePump(cut_down={9, 17}, cut_up={8, 14}), x, timeout=0.5)
    assert cut["link"]["retries"] >= 2  # a retry per cut, or fewer where two cuts hit one exchange
    assert clean["link"]["retries"] == 0
    assert cut["check"] == clean["check"] and cut["check"]["outputs_match"]
    assert cut["memory"] == clean["memory"]


def test_real_reset_mid_inference_fails_clearly_without_numbers(cnn, x):
    """QEMU's monitor resets the machine while it runs the inferences (500 take ~0.5 s)."""
    elf = profile_firmware(cnn)
    target = load_target(load_build(cnn)["target"])
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    uart, monitor = ports
    cmd = qemu_command(target, elf, f"tcp:127.0.0.1:{uart},server=on,wait=on")
    cmd[cmd.index("-monitor") + 1] = f"tcp:127.0.0.1:{monitor},server=on,wait=off"
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                mon = socket.create_connection(("127.0.0.1", monitor), timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "QEMU did not start"
                time.sleep(0.05)
        resets = []

        def on_up(type_):
            if type_ == P.RUN and not resets:
                resets.append(time.monotonic())
                mon.sendall(b"system_reset\n")

        pump = FramePump(on_up=on_up).connect_upstream(uart)
        t0 = time.monotonic()
        with pytest.raises(P.DeviceReset, match="reset in the middle of the session"):
            profile(cnn, f"socket://127.0.0.1:{pump.port}", inputs=x, elf=elf, timeout=1.0,
                    runs=500)
        assert resets and time.monotonic() - t0 < 20
        mon.close()
    finally:
        proc.kill()
        proc.communicate()
