"""A TCP man in the middle between the profiling host and QEMU's UART, for link-fault tests.

Subclasses define `_pump(src, dst, down)`: forward (and damage) one direction; `down` is
device → host. `profile_through` starts QEMU, puts the proxy in front of it and profiles.
"""

import socket
import threading

from edgeprune.compile import load_build
from edgeprune.profile import profile, profile_firmware
from edgeprune.qemu import start_qemu_tcp, stop_qemu
from edgeprune.targets import load_target


class ManInTheMiddle:
    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream = None

    def connect_upstream(self, qemu_port):
        self.upstream = socket.create_connection(("127.0.0.1", qemu_port), timeout=1)
        self.upstream.settimeout(None)
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def _serve(self):
        client, _ = self.listener.accept()
        threading.Thread(target=self._pump, args=(self.upstream, client, True), daemon=True).start()
        self._pump(client, self.upstream, False)

    def _pump(self, src, dst, down):
        raise TypeError(f"{type(self).__name__} must define _pump")


def profile_through(build, proxy: ManInTheMiddle, inputs, **kw):
    """Profile `build` via socket:// through `proxy` to a QEMU started here (always stopped)."""
    elf = profile_firmware(build)
    target = load_target(load_build(build)["target"])
    proc, _ = start_qemu_tcp(target, elf, proxy.connect_upstream)
    try:
        return profile(build, f"socket://127.0.0.1:{proxy.port}", inputs=inputs, elf=elf, **kw)
    finally:
        stop_qemu(proc, timeout=2)
