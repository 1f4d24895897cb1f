#!/usr/bin/env bash
# System packages the test suite needs beyond the venv: Debian's chromium and chromium-driver, for the
# chat page test. Idempotent; without root or apt it says what is missing and leaves the test to skip.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "chromium/chromedriver missing and cannot be installed here (needs root and apt-get); the chat page test will skip" >&2
    exit 0
fi
apt-get install -y -q chromium chromium-driver >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } \
    || echo "installing chromium failed; the chat page test will skip" >&2
