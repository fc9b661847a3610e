"""A real browser for the tests that drive a page (tests/test_demo.py): Debian's headless Chromium
and its chromium-driver, through Selenium. Playwright's browser download is not reachable from
these machines; Debian's packages are.

    why_not = install_chromium()   # None once /usr/bin/chromium and /usr/bin/chromedriver are there
    driver = chromium(tmp_path)    # a headless selenium webdriver; driver.quit() when done

Installing follows slurm/dev/cluster.sh: apt-get, as root (or with passwordless sudo), only for
what is missing, so a clean CI machine gets the browser from the test set-up itself. Without
apt-get or root the reason comes back (the caller skips with it); an apt-get that runs and
fails raises, since the machine could have had the browser.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import List, Optional

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PACKAGES = {CHROMIUM: "chromium", CHROMEDRIVER: "chromium-driver"}
# Two pytest sessions (or the SLURM tests' cluster.sh) may install at once: one lock file for this
# helper, and apt-get's own wait on dpkg's lock for everything else.
LOCK = Path("/tmp/toolkit-chromium-install.lock")
APT_TRIES = 3  # `apt-get update` does not wait for another apt's lists lock: try again after a pause


def missing() -> List[str]:
    """The Debian packages whose programs are not installed."""
    return [pkg for path, pkg in PACKAGES.items() if not os.access(path, os.X_OK)]


def _as_root() -> Optional[List[str]]:
    """The command prefix that runs as root ([] as root, sudo -n where allowed), or None."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def install_chromium(timeout: int = 900) -> Optional[str]:
    """Install what is missing of chromium and chromium-driver -> None when both are there, or
    why they cannot be installed here (no apt-get, not root). RuntimeError when apt-get fails."""
    if not missing():
        return None
    if shutil.which("apt-get") is None:
        return f"no {', '.join(missing())}, and no apt-get to install them with"
    root = _as_root()
    if root is None:
        return f"no {', '.join(missing())}; installing them needs root or passwordless sudo"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = [*root, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-o", "DPkg::Lock::Timeout=300"]
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        todo = missing()  # another session may have installed them while this one waited
        for attempt in range(APT_TRIES):
            if not todo:
                return None
            update = subprocess.run([*apt, "update", "-qq"], capture_output=True, text=True, env=env, timeout=timeout)
            proc = update if update.returncode else subprocess.run(
                [*apt, "install", "-y", "-qq", *todo], capture_output=True, text=True, env=env, timeout=timeout)
            todo = missing()
            if not todo:
                return None
            if attempt < APT_TRIES - 1:
                time.sleep(10)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"apt-get could not install {' '.join(todo)} (exit {proc.returncode}): {' | '.join(tail)}")


def chromium(tmp_dir: Path, width: int = 1280, height: int = 1600):
    """A headless Chromium under Selenium, with Debian's driver named explicitly (so Selenium
    Manager never tries to download one) and a profile in TMP_DIR."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new",
                "--no-sandbox",  # Chromium's sandbox refuses to run as root, which CI containers are
                "--disable-dev-shm-usage",  # containers' /dev/shm is often 64 MB: too small for a page
                "--disable-gpu", f"--window-size={width},{height}", f"--user-data-dir={tmp_dir / 'profile'}",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_dir / "chromedriver.log"))
    return webdriver.Chrome(service=service, options=options)
