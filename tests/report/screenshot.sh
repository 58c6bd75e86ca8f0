#!/usr/bin/env bash
# Renders an audit report in headless Chromium and saves a full-page screenshot, to check by eye that the
# self-contained report.html displays without network access.
#
#   bash tests/report/screenshot.sh reports/sample/report.html [OUT.png]
#
# Installs Debian's chromium when it is missing (needs root and apt).
set -euo pipefail
html=${1:-reports/sample/report.html}
png=${2:-$(dirname "$html")/report.png}
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# The background-networking flags keep Chromium from reaching for Google's hosts on a closed network.
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size=1200,4200 \
  --screenshot="$(realpath -m "$png")" "file://$(realpath "$html")" 2>/dev/null
echo "$png"
