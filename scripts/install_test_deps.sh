#!/usr/bin/env bash
# System packages the test suite needs beyond the venv: Debian's chromium and chromium-driver (the chat page
# test) and postgresql (the ledger on PostgreSQL). Idempotent; without root or apt it says what is missing
# and leaves those tests to skip.
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "missing ${missing[*]}, which cannot be installed here (needs root and apt-get); their tests will skip" >&2
    exit 0
fi
apt-get install -y -q "${missing[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; } \
    || echo "installing ${missing[*]} failed; their tests will skip" >&2
