"""The search's Pareto plot (accuracy vs measured latency) as a PNG, without a plotting library:
a small raster, a 3x5 pixel font for the axis numbers, zlib + the PNG chunk format."""

from __future__ import annotations

import struct
import zlib

W, H, PAD = 480, 320, 40
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (200, 200, 200)
BLUE, ORANGE, RED, GREEN = (31, 119, 180), (255, 127, 14), (214, 39, 40), (44, 160, 44)

# 3x5 glyphs, rows top to bottom, 3 bits per row (MSB = left)
FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
    "%": (5, 1, 2, 4, 5), "m": (0, 0, 7, 7, 5), "s": (0, 3, 6, 1, 6), " ": (0, 0, 0, 0, 0),
}


class Canvas:
    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.px = bytearray(bytes(WHITE) * (w * h))

    def dot(self, x: int, y: int, c) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i:i + 3] = bytes(c)

    def rect(self, x0, y0, x1, y1, c) -> None:
        for y in range(int(y0), int(y1) + 1):
            for x in range(int(x0), int(x1) + 1):
                self.dot(x, y, c)

    def line(self, x0, y0, x1, y1, c) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0), 1))
        for i in range(n + 1):
            self.dot(round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n), c)

    def text(self, x: int, y: int, s: str, c=BLACK, scale: int = 2) -> None:
        for ch in s:
            for row, bits in enumerate(FONT.get(ch, FONT[" "])):
                for col in range(3):
                    if bits >> (2 - col) & 1:
                        self.rect(x + col * scale, y + row * scale,
                                  x + col * scale + scale - 1, y + row * scale + scale - 1, c)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w:3 * (y + 1) * self.w])
                       for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return (struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h,
                                                                   8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both latency (lower) and accuracy (higher)."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def pareto_png(trajectory: list[dict], latency_budget: float | None = None) -> bytes:
    """Every trajectory point (blue; the final one green), the Pareto front (orange) and the
    latency budget (red). x: measured latency (ms), y: accuracy (%); corners are labelled."""
    pts = [(p["latency_ms"], p["accuracy"]) for p in trajectory
           if p.get("latency_ms") is not None and p.get("accuracy") is not None]
    c = Canvas(W, H)
    if not pts:
        return c.png()
    xs = [x for x, _ in pts] + ([latency_budget] if latency_budget else [])
    ys = [y for _, y in pts]
    x0, x1 = 0.0, max(xs) * 1.05
    y0, y1 = min(ys) - 1.0, max(ys) + 1.0

    def sx(x):
        return PAD + (x - x0) / (x1 - x0 or 1) * (W - 2 * PAD)

    def sy(y):
        return H - PAD - (y - y0) / (y1 - y0 or 1) * (H - 2 * PAD)
    c.line(PAD, H - PAD, W - PAD, H - PAD, BLACK)
    c.line(PAD, PAD, PAD, H - PAD, BLACK)
    for i in range(1, 5):
        gy = PAD + i * (H - 2 * PAD) / 5
        c.line(PAD + 1, gy, W - PAD, gy, GREY)
    if latency_budget:
        c.line(sx(latency_budget), PAD, sx(latency_budget), H - PAD - 1, RED)
    front = pareto_front(pts)
    for (ax, ay), (bx, by) in zip(front, front[1:]):
        c.line(sx(ax), sy(ay), sx(bx), sy(by), ORANGE)
    for i, (x, y) in enumerate(pts):
        col = GREEN if i == len(pts) - 1 else BLUE
        c.rect(sx(x) - 3, sy(y) - 3, sx(x) + 3, sy(y) + 3, col)
    c.text(PAD, H - PAD + 8, f"{x0:.0f}")
    label = f"{x1:.2f} ms"
    c.text(W - PAD - 8 * len(label), H - PAD + 8, label)
    c.text(4, H - PAD - 10, f"{y0:.1f}")
    c.text(4, PAD - 4, f"{y1:.1f}%")
    return c.png()
