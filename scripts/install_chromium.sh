#!/bin/sh
# Debian's chromium for the browser test (tests/test_demo_browser.py drives it with Playwright at
# /usr/bin/chromium; Playwright's own browser download is never used). Needs root (or sudo) and apt;
# refreshes the apt lists only when the package is not found with the current ones. Idempotent.
set -eu

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "install_chromium: needs apt-get (a Debian/Ubuntu machine); install chromium at /usr/bin/chromium yourself" >&2; exit 1; }
if [ "$(id -u)" -eq 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1; then
    as_root="sudo -n"
else
    echo "install_chromium: installing chromium needs root; run: apt-get install -y chromium" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! $as_root apt-get install -y -q --no-install-recommends chromium >/dev/null; then
    $as_root apt-get update -q >/dev/null
    $as_root apt-get install -y -q --no-install-recommends chromium >/dev/null
fi
/usr/bin/chromium --version
