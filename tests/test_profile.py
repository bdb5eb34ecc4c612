"""Profiling over serial: real QEMU, its UART on a real TCP socket, pyserial on the host."""

import json
import socket
import threading
import time

import numpy as np
import pytest

from edgeprune import protocol as P
from edgeprune.cli import main
from edgeprune.profile import from_simulation, profile, profile_firmware, read_energy_meter
from edgeprune.simulate import simulate
from edgeprune.targets import load_target
from tcp_proxy import ManInTheMiddle, profile_through


@pytest.fixture(scope="module")
def cnn(zoo_build):
    return zoo_build("cnn")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """One Fashion-MNIST test image as .npy (loading the data set once, not per profile)."""
    from edgeprune.simulate import default_inputs
    path = tmp_path_factory.mktemp("input") / "x.npy"
    np.save(path, default_inputs((1, 1, 28, 28), 1)[0])
    return path


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_qemu_profile_counts_sum_match_simulate_and_repeat(cnn, image, tmp_path, capsys):
    meter = tmp_path / "meter.csv"
    meter.write_text("timestamp_s,uj\n0.0,1000\n0.5,1300\n1.0,1600\n")
    rc, out, err = run_cli(capsys, "profile", cnn, "--port", "qemu", "--runs", "3", "--json",
                           "--energy-meter", meter, "--input", image)
    assert rc == 0, err
    r = json.loads(out)
    assert r["target"] == "cortex-m7"
    lat = r["latency"]
    assert lat["source"].startswith("qemu-instructions") and lat["cycles"] is None
    assert lat["ms"] == pytest.approx(1000 * lat["instructions"] / 216e6)
    layer_sum = sum(l["instructions"] for l in r["layers"])
    assert abs(layer_sum - lat["instructions"]) <= 0.01 * lat["instructions"]
    assert r["deterministic"] is True  # all 3 inferences counted the same
    # The same kernels as simulate's firmware; only the harness's per-layer hook differs
    # (it also reads the cycle counter): a few instructions per layer.
    sim, _ = simulate(cnn, np.load(image))
    assert [l["name"] for l in r["layers"]] == [l["name"] for l in sim["layers"]]
    for mine, theirs in zip(r["layers"], sim["layers"]):
        assert abs(mine["instructions"] - theirs["instructions"]) <= 32, (mine, theirs)
    assert abs(lat["instructions"] - sim["instructions"]) <= 32 * len(r["layers"])
    # deploy/feedback's conversion of a simulate run: the same power model and clock.
    target = load_target("cortex-m7")
    from_sim = from_simulation(target, sim)
    assert from_sim["energy"]["uj"] == pytest.approx(target.power_mw * sim["instructions"] / 216e3)
    assert from_sim["energy"]["source"].startswith("power-model")
    assert r["check"]["outputs_match"] and r["check"]["mismatches"] == 0
    # MACs of the convs and the dense layer (28x28 grey input, 8 then 16 3x3 filters, 16 -> 10).
    assert [l["macs"] for l in r["layers"]] == [8 * 28 * 28 * 9, None, 16 * 14 * 14 * 8 * 9,
                                                None, None, 16 * 10]
    writes = [l["writes"] for l in r["layers"]]     # each call's model tensor, one per call
    assert all(writes) and len(set(writes)) == len(writes)
    mem = r["memory"]
    assert 0 < mem["stack_bytes"] < mem["stack_reserved_bytes"] == 16384
    assert mem["arena_bytes"] > 0 and mem["flash_bytes"] > mem["weights_bytes"] > 0
    assert mem["sram_bytes"] >= mem["arena_bytes"]
    # Meter: (1600 - 1000) µJ over 3 runs; layers share it in proportion to their time.
    assert r["energy"]["uj"] == pytest.approx(200.0)
    assert r["energy"]["source"].startswith("meter")
    assert sum(l["uj"] for l in r["layers"]) == pytest.approx(200.0 * layer_sum / lat["instructions"])
    assert r["link"]["retries"] == 0


def test_power_model_energy_and_table(cnn, image, capsys):
    rc, out, err = run_cli(capsys, "profile", cnn, "--port", "qemu", "--input", image)
    assert rc == 0, err
    assert "fused_conv2d_add_relu" in out and "stack high-water" in out and "match" in out
    assert "layer (tensor written)" in out
    assert "power-model" in out


class Proxy(ManInTheMiddle):
    """A TCP man in the middle between the host and QEMU that damages the byte stream.

    Byte offsets count the stream in each direction: `flip_*` XOR that byte, `garbage_down`
    inserts junk (with a start byte and a bogus length) before it, `boot_down_at` a valid BOOT frame.
    """

    GARBAGE = b"\xa5\x13\x00\xff\x01garbage\x00"

    def __init__(self, flip_down=(), flip_up=(), garbage_down=(), boot_down_at=None):
        super().__init__()
        self.flip = {True: set(flip_down), False: set(flip_up)}
        self.garbage_down, self.boot_down_at = set(garbage_down), boot_down_at

    def _pump(self, src, dst, down):
        count = 0
        try:
            while data := src.recv(4096):
                out = bytearray()
                for b in data:
                    if down and count in self.garbage_down:
                        out += self.GARBAGE
                    if down and count == self.boot_down_at:
                        out += P.encode(P.BOOT, 0, b"EPPF")
                    out.append(b ^ 0x5A if count in self.flip[down] else b)
                    count += 1
                dst.sendall(bytes(out))
        except OSError:
            pass


def through_proxy(cnn, image, proxy, **kw):
    return profile_through(cnn, proxy, np.load(image), **kw)


def test_garbage_and_corrupted_frames_are_survived_with_the_same_numbers(cnn, image):
    clean = through_proxy(cnn, image, Proxy(), timeout=3)
    noisy = through_proxy(cnn, image, Proxy(flip_down={40, 300}, flip_up={3, 12, 200}, garbage_down={0, 30, 150, 151}),
                          timeout=0.5, retries=8)
    assert noisy["link"]["retries"] >= 3 and noisy["link"]["dropped_bytes"] > 0
    assert noisy["check"] == clean["check"] and noisy["check"]["outputs_match"]
    assert noisy["memory"] == clean["memory"]
    # QEMU has no DWT and socket:// attaches no plugin: no latency, and the report says so.
    assert noisy["latency"]["ms"] is None and noisy["latency"]["source"].startswith("none")


def test_device_reset_mid_session_is_an_error_not_a_number(cnn, image):
    t0 = time.monotonic()
    with pytest.raises(P.DeviceReset, match="reset"):
        through_proxy(cnn, image, Proxy(boot_down_at=200), timeout=0.5)
    assert time.monotonic() - t0 < 30


def test_protocol_version_mismatch_is_refused(cnn, image, tmp_path):
    elf = profile_firmware(cnn, {"EP_PROTO_VERSION": "99"}, tmp_path / "fw99")
    with pytest.raises(P.ProtocolError, match="version 99.*version 1"):
        profile(cnn, "qemu", inputs=np.load(image), elf=elf)


def test_silent_device_times_out_with_a_clear_error(cnn, image):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(P.ProtocolError, match=r"no valid answer.*3 tries.*no answer within 0.3 s"):
        profile(cnn, f"socket://127.0.0.1:{port}", inputs=np.load(image), timeout=0.3, retries=2)
    assert time.monotonic() - t0 < 5
    server.close()


def test_unreachable_port_is_a_clear_error(cnn, image, capsys):
    rc, _, err = run_cli(capsys, "profile", cnn, "--port", "socket://127.0.0.1:1", "--input", image)
    assert rc == 2 and "cannot open serial port socket://127.0.0.1:1" in err


def test_frame_reader_resyncs_after_garbage_and_bad_crc():
    good = P.encode(0x81, 7, b"hello")
    bad = bytearray(P.encode(0x82, 8, b"world"))
    bad[-1] ^= 1
    r = P.FrameReader()
    r.feed(b"\x00\xa5\xff\xff" + bytes(bad) + good[:4])
    assert r.next_frame() is None  # the good frame is not complete yet
    r.feed(good[4:])
    assert r.next_frame() == (0x81, 7, b"hello")
    assert r.dropped > 0 and r.next_frame() is None


def test_energy_meter_formats(tmp_path):
    f = tmp_path / "m.csv"
    f.write_text("timestamp_s,mw\n0,100\n1,300\n")
    uj, source = read_energy_meter(f, 2)
    assert uj == pytest.approx(200.0 * 1000 / 2) and "mW samples" in source
    f.write_text("time,joules\n0,1\n")
    with pytest.raises(Exception, match="header"):
        read_energy_meter(f, 1)
    f.write_text("timestamp_s,uj\n1,5\n0,9\n")
    with pytest.raises(Exception, match="increase"):
        read_energy_meter(f, 1)
