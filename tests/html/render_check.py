"""Open HTML reports in headless Chromium (Debian's, driven by Playwright) and say
what rendered: one JSON object per file on stdout.

usage: render_check.py CHROMIUM SCREENSHOT_DIR FILE.html...

For each file: console errors and uncaught page errors, and every
`svg[data-plot]` with its name, rendered size (CSS pixels) and the number of
drawn SVG elements inside it; a full-page screenshot goes to SCREENSHOT_DIR
(kept out of the repository: target/).
"""
import json
import pathlib
import sys

from playwright.sync_api import sync_playwright

# The flags a closed network needs (no background connections, no sandbox as root).
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

DRAWN = "rect,line,path,polyline,polygon,circle,text"


def main():
    chromium, shots, files = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS, headless=True)
        for f in files:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors = []
            requests = []
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: r.url.startswith("file:") or requests.append(r.url))
            path = pathlib.Path(f).resolve()
            page.goto(path.as_uri(), wait_until="load")
            plots = page.evaluate(
                """(drawn) => [...document.querySelectorAll('svg[data-plot]')].map(s => {
                    const r = s.getBoundingClientRect();
                    return {name: s.dataset.plot, width: r.width, height: r.height,
                            drawn: s.querySelectorAll(drawn).length};
                })""",
                DRAWN,
            )
            page.screenshot(path=str(shots / (path.stem + ".png")), full_page=True)
            print(json.dumps({
                "file": str(path),
                "title": page.title(),
                "errors": errors,
                "requests": requests,
                "plots": plots,
            }))
            page.close()
        browser.close()


if __name__ == "__main__":
    main()
