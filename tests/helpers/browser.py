"""A headless Chromium driven through chromedriver's WebDriver HTTP API (plain urllib, no
Selenium): open a page, run a script in it, read its console log, take a screenshot.

``find_chromium()`` says whether a browser is there (Debian: ``apt-get install chromium
chromium-driver``); tests that need it skip with that reason when it is not.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from helpers.gloo import free_port

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> tuple[str, str] | None:
    """(browser, chromedriver) executables, or None."""
    browser = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


class HeadlessChromium:
    def __init__(self, browser: str, driver: str, timeout: float = 60.0):
        self.port = free_port()
        self.profile = tempfile.TemporaryDirectory(prefix="kdlab-chromium-")
        self.driver = subprocess.Popen([driver, f"--port={self.port}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        options = {"binary": browser,
                   "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--window-size=1280,1600",
                            f"--user-data-dir={self.profile.name}"]}
        caps = {"browserName": "chrome", "goog:chromeOptions": options,
                "goog:loggingPrefs": {"browser": "ALL"}}
        try:
            self.session = self._call("POST", "/session",
                                      {"capabilities": {"alwaysMatch": caps}})["sessionId"]
        except Exception:
            self.close()
            raise

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float = 60.0):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"{}").get("value")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"WebDriver {method} {path}: {e.read()[:500]!r}") from None

    def _session(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def run(self, script: str):
        """The value of ``script`` (a function body: ``return ...``) in the page."""
        return self._session("POST", "/execute/sync", {"script": script, "args": []})

    def console(self) -> list[dict]:
        """Browser log entries since the last call: {level, message, source, timestamp}."""
        return self._session("POST", "/se/log", {"type": "browser"}) or []

    def screenshot(self, path: Path) -> Path:
        Path(path).write_bytes(base64.b64decode(self._session("GET", "/screenshot")))
        return Path(path)

    def close(self) -> None:
        try:
            if getattr(self, "session", None):
                self._session("DELETE", "")
        except Exception:
            pass
        self.driver.terminate()
        try:
            self.driver.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.driver.kill()
        self.profile.cleanup()

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# What a page shows about itself once loaded.
PAGE_STATE = """
return {
  ready: document.readyState,
  title: document.title,
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
                                                  width: i.naturalWidth,
                                                  height: i.naturalHeight})),
  tables: document.querySelectorAll('table').length,
  text: document.body ? document.body.innerText : '',
  external: Array.from(document.querySelectorAll('[src],[href]'))
               .map(n => n.getAttribute('src') || n.getAttribute('href'))
               .filter(u => !u.startsWith('data:') && !u.startsWith('#')),
  performance: performance.getEntriesByType('resource').map(r => r.name)
               .filter(u => !u.startsWith('data:')),
};
"""
