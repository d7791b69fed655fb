#!/usr/bin/env bash
# Debian packages the test suite uses, installed when missing (the README's test command runs this):
#   a Java runtime              pycocoevalcap's PTB tokenizer and METEOR (caption metrics)
#   chromium + chromium-driver  the headless browser that drives `zerovl webui` in tests/serving/test_webui.py
# Without apt-get (not Debian, not root) it says so in one line and the tests that need them skip.
set -uo pipefail
need=()
command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
if ! command -v apt-get >/dev/null 2>&1 || { [ "$(id -u)" -ne 0 ] && [ -z "$sudo" ]; }; then
    echo "system-deps: cannot install ${need[*]} (no apt-get or no root); the tests that need them will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/zerovl-apt.log 2>&1 \
    || { $sudo apt-get update -q >>/tmp/zerovl-apt.log 2>&1 \
         && $sudo apt-get install -y -q --no-install-recommends "${need[@]}" >>/tmp/zerovl-apt.log 2>&1; } \
    || echo "system-deps: installing ${need[*]} failed (see /tmp/zerovl-apt.log); the tests that need them will skip"
exit 0
