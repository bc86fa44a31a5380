#!/usr/bin/env bash
# Optional, for scripts/bench.py's CRIU comparison only (cowtree never needs CRIU).
#
# Debian 12's criu (3.17.1) fails `criu check` on this kernel ("vdso: Unexpected rt vDSO
# area bounds": kernels since 6.13 map a [vvar_vclock] area it does not know).  Debian 13's
# criu 4.1.1 works, but needs a newer libc than Debian 12 has, so this puts a minimal
# Debian 13 tree in $DEST (debootstrap, from the Debian archive) and writes $DEST/criu, a
# wrapper that runs that criu with its own loader and libraries.  The system is untouched.
set -euo pipefail
DEST="${1:-/opt/cowtree-criu}"
mkdir -p "$DEST"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if ! command -v debootstrap >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
if [ ! -x "$DEST/root/usr/sbin/criu" ]; then
    debootstrap --variant=minbase --include=criu trixie "$DEST/root" "$MIRROR" >"$DEST.log" 2>&1 \
        || { echo "get-criu: debootstrap failed, see $DEST.log" >&2; exit 1; }
fi
cat >"$DEST/criu" <<WRAP
#!/bin/sh
exec "$DEST/root/lib64/ld-linux-x86-64.so.2" --library-path "$DEST/root/usr/lib/x86_64-linux-gnu" \
    "$DEST/root/usr/sbin/criu" "\$@"
WRAP
chmod 755 "$DEST/criu"
"$DEST/criu" --version | head -1
"$DEST/criu" check
