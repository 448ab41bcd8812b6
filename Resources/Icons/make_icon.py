"""Draw the extension icon (128 x 128 PNG) from scratch with numpy + PIL; no copied art.

A grey axial "CT slice" disc, a warm segment blob with a bright outline, and the
dashed self-prompt box around it. Run: python Resources/Icons/make_icon.py
"""
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 128


def draw() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    rgba = np.zeros((SIZE, SIZE, 4), np.float32)
    body = ((x - 64) / 56) ** 2 + ((y - 66) / 48) ** 2 <= 1.0
    texture = 0.35 + 0.1 * np.sin(x / 5.0) * np.cos(y / 7.0)
    rgba[body, :3] = texture[body, None] * 255
    rgba[body, 3] = 255
    blob = ((x - 70) / 22) ** 2 + ((y - 60) / 17) ** 2 + 0.15 * np.sin(x / 4.0) <= 1.0
    rgba[blob & body, :3] = [242, 180, 50]
    edge = blob & ~(np.roll(blob, 2, 0) & np.roll(blob, -2, 0) & np.roll(blob, 2, 1) & np.roll(blob, -2, 1))
    rgba[edge, :3] = [255, 240, 200]
    ys, xs = np.nonzero(blob)
    x0, x1, y0, y1 = xs.min() - 5, xs.max() + 5, ys.min() - 5, ys.max() + 5
    dash = ((x // 6 + y // 6) % 2 == 0)
    for sel in ((y >= y0 - 1) & (y <= y0 + 1) & (x >= x0) & (x <= x1),
                (y >= y1 - 1) & (y <= y1 + 1) & (x >= x0) & (x <= x1),
                (x >= x0 - 1) & (x <= x0 + 1) & (y >= y0) & (y <= y1),
                (x >= x1 - 1) & (x <= x1 + 1) & (y >= y0) & (y <= y1)):
        rgba[sel & dash] = [80, 200, 255, 255]
    return Image.fromarray(rgba.clip(0, 255).astype(np.uint8), "RGBA")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    image = draw()
    for target in (here / "SAMSelfPrompt.png", here.parents[1] / "SAMSelfPrompt" / "Resources" / "Icons" / "SAMSelfPrompt.png"):
        image.save(target)
        print("wrote", target)
