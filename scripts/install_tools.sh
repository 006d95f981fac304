#!/usr/bin/env bash
# The system binaries the tests use: promtool (Debian's prometheus) for the alert rules'
# unit tests, prometheus-pushgateway for --metrics-push.  Installed only when missing, and
# only where it can be done (root, apt-get); otherwise a line saying what to install (the
# tests skip locally without them and fail in CI).
set -uo pipefail
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus-pushgateway >/dev/null 2>&1 || missing+=(prometheus-pushgateway)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || echo "warning: could not install ${missing[*]}" >&2
    # The Debian packages start their services; the tests run their own, on free ports.
    for service in prometheus prometheus-pushgateway; do
        command -v systemctl >/dev/null 2>&1 && systemctl disable --now "$service" >/dev/null 2>&1 || true
    done
else
    echo "note: missing ${missing[*]}: apt-get install ${missing[*]} (tests that need them skip, and fail in CI)" >&2
fi
exit 0
