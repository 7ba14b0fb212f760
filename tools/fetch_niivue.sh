#!/bin/sh
# Vendor the NiiVue viewer (https://github.com/niivue/niivue, BSD-2-Clause) for report.html.
#
# Fetches the pinned @niivue/niivue release with `npm pack` (npm checks the tarball against the registry's
# sha512 integrity), takes its single-file browser build dist/niivue.umd.js (a UMD bundle that defines the
# global `niivue` when loaded by a classic <script>; no chunks, workers or network loads), checks its SHA-256
# against the pinned value and installs it, with a JSON record of version, hash and source, in
# medseg_diff/export/vendor/ (git-ignored), where medseg_diff.export.viewer inlines it into each report.
#
# Never fails `make setup`: without npm, offline, or on a hash mismatch it prints why and exits 0; reports
# then say the interactive viewer is unavailable and keep the static montage.
# Usage: sh tools/fetch_niivue.sh [--force]
set -u

VERSION=0.69.0
FILE=dist/niivue.umd.js
SHA256=47b896b77ec4a5be3ef1949c33ad393b6f45629921f326c279000bcf51bdb4af
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST="$ROOT/medseg_diff/export/vendor"
JS="$DEST/niivue.umd.js"
INFO="$DEST/niivue.json"

say() { echo "fetch_niivue: $*"; }
sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
    else shasum -a 256 "$1" | cut -d' ' -f1; fi
}
unavailable() {
    say "$1"
    say "report.html will show the static montage only (no interactive viewer)."
    say "to add the viewer later: install Node.js/npm, then run 'sh tools/fetch_niivue.sh' (or 'make setup')."
    exit 0
}

if [ "${1:-}" != "--force" ] && [ -f "$JS" ] && [ -f "$INFO" ] && [ "$(sha256_of "$JS")" = "$SHA256" ]; then
    say "NiiVue $VERSION already vendored ($JS)"
    exit 0
fi
command -v npm >/dev/null 2>&1 || unavailable "npm not found, NiiVue viewer not installed."
command -v tar >/dev/null 2>&1 || unavailable "tar not found, NiiVue viewer not installed."

WORK=$(mktemp -d "${TMPDIR:-/tmp}/niivue.XXXXXX") || unavailable "cannot create a temporary folder."
trap 'rm -rf "$WORK"' EXIT INT TERM
say "fetching @niivue/niivue@$VERSION from the npm registry"
if ! (cd "$WORK" && npm pack "@niivue/niivue@$VERSION" --silent --no-fund --no-audit --ignore-scripts \
        --fetch-retries=1 --fetch-retry-mintimeout=2000 --fetch-retry-maxtimeout=5000 --fetch-timeout=60000 \
        >pack.log 2>&1); then
    tail -n 5 "$WORK/pack.log" | sed 's/^/  npm: /'
    unavailable "npm pack @niivue/niivue@$VERSION failed (offline or registry unreachable)."
fi
TARBALL=$(ls "$WORK"/*.tgz 2>/dev/null | head -n 1)
[ -n "$TARBALL" ] || unavailable "npm pack wrote no tarball."
tar -xzf "$TARBALL" -C "$WORK" "package/$FILE" 2>/dev/null || unavailable "the tarball has no $FILE."
GOT=$(sha256_of "$WORK/package/$FILE")
[ "$GOT" = "$SHA256" ] || unavailable "SHA-256 of $FILE is $GOT, expected $SHA256; not installed."

mkdir -p "$DEST" || unavailable "cannot create $DEST."
cp "$WORK/package/$FILE" "$JS.tmp" && mv "$JS.tmp" "$JS" || unavailable "cannot write $JS."
SIZE=$(wc -c <"$JS" | tr -d ' ')
cat >"$INFO" <<JSON
{
  "package": "@niivue/niivue",
  "version": "$VERSION",
  "file": "$FILE",
  "sha256": "$SHA256",
  "bytes": $SIZE,
  "license": "BSD-2-Clause",
  "source": "https://registry.npmjs.org/@niivue/niivue/-/niivue-$VERSION.tgz",
  "homepage": "https://github.com/niivue/niivue"
}
JSON
say "installed NiiVue $VERSION ($SIZE bytes, sha256 $SHA256) in $DEST"
