#!/usr/bin/env bash
# System tools the tests use for real:
# - dciodvfy (dicom3tools) validates the DICOM-SEG output;
# - Debian's chromium is the browser the web app's end-to-end test drives through playwright
#   (launched from /usr/bin/chromium; `playwright install` is never run).
# Installed with apt when missing; fails loudly otherwise.
set -euo pipefail
need=()
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing system packages: ${need[*]}"
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
  command -v sudo >/dev/null 2>&1 || { echo "ERROR: need root or sudo to apt-get install ${need[*]}" >&2; exit 1; }
else
  SUDO=
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
[ -x /usr/bin/chromium ] || { echo "ERROR: chromium was installed but /usr/bin/chromium is missing" >&2; exit 1; }
