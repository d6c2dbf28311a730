#!/usr/bin/env bash
# Packs a built loragate binary as a release asset and records its SHA-256 sum, as the action's
# install step verifies it (action/install.sh).
#
#   scripts/package-release.sh BINARY ASSET_NAME OUT_DIR
#   scripts/package-release.sh target/release/loragate loragate-x86_64-linux.tar.gz dist
#
# Writes OUT_DIR/ASSET_NAME (the binary as `loragate`, stripped, with the licence files) and
# appends "<sha256>  ASSET_NAME" to OUT_DIR/SHA256SUMS.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 BINARY ASSET_NAME OUT_DIR" >&2; exit 2; }
bin=$1 asset=$2 out=$3
[ -x "$bin" ] || { echo "$bin: not an executable" >&2; exit 2; }
case "$asset" in *.tar.gz) ;; *) echo "$asset: the asset must be a .tar.gz" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$bin" "$work/loragate"
strip "$work/loragate" 2>/dev/null || true
for f in LICENSE LICENSE-MIT LICENSE-APACHE README.md; do
  [ -f "$root/$f" ] && cp "$root/$f" "$work/"
done
# Plain member names (no ./ prefix): `tar -xzf ASSET loragate` takes the binary alone.
mapfile -t members < <(ls "$work")
tar -czf "$out/$asset" -C "$work" "${members[@]}"
(cd "$out" && sha256sum "$asset" >>SHA256SUMS)
echo "$out/$asset"
