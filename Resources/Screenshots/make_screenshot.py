"""Take the extension's screenshot: the web app segmenting a real CT series with the shipped model.

Starts `samselfprompt app SERIES` on a free port, drives Debian chromium (playwright) to press
Auto-segment, waits until every slice is written, and saves the page as a palette PNG (under 500 KB).
The series is the TotalSegmentator example CT (Apache-2.0 repository, data CC BY 4.0; Wasserthal et
al., Radiology: AI 2023), found in ../shared/data when it is there.

Run: .venv/bin/python Resources/Screenshots/make_screenshot.py [SERIES_FOLDER]
"""
from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
SERIES = HERE.parents[1].parent / "shared" / "data" / "ct_totalseg" / "dicom"
OUT = HERE / "WebAppCT.png"


def main(series: Path = SERIES) -> None:
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    app = subprocess.Popen([sys.executable, "-m", "SAMSelfPromptLib.cli.main", "app", str(series), "--port", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium")
            page = browser.new_page(viewport={"width": 1200, "height": 720})
            page.goto(url)
            page.wait_for_selector("#ssp-apply")
            page.wait_for_function("document.querySelector('#ssp-choice').innerText.includes('Runs:')")
            page.click("#ssp-apply")
            page.wait_for_function("document.querySelector('#ssp-status').innerText.startsWith('Done')", timeout=600_000)
            time.sleep(2)  # the last render reaches the page
            png = page.screenshot()
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=30)
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    image.save(OUT, optimize=True)
    print(f"{OUT}: {OUT.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else SERIES)
