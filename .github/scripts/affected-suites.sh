#!/usr/bin/env bash
# Prints `suites=<JSON list>` of the suites a change affects: suites that changed, suites whose
# baselines changed, and suites that name a changed LoRA file. Without a base commit (manual
# runs), the asked suites or every suite. Each entry is {"file": path, "name": a name safe for
# artifact names (letters, digits, `-`, `_`, `.`; upload-artifact rejects `/`)}.
set -euo pipefail
all=$(ls suites/*.yaml 2>/dev/null || true)
if [ -n "${ASKED:-}" ]; then
  picked="$ASKED"
elif [ -z "${BASE:-}" ]; then
  picked="$all"
else
  changed=$(git diff --name-only "$BASE"...HEAD)
  picked=""
  for s in $all; do
    name=$(basename "$s" .yaml)
    if grep -qx "$s" <<<"$changed" || grep -q "^baselines/$name/" <<<"$changed"; then
      picked="$picked $s"
      continue
    fi
    for f in $(grep -E '^\s*\.?/?[^#]*\.safetensors' <<<"$changed" || true); do
      if grep -q "$(basename "$f")" "$s"; then
        picked="$picked $s"
        break
      fi
    done
  done
fi
printf 'suites=['
sep=""
for s in $picked; do
  safe=$(basename "$s" .yaml | tr -c 'A-Za-z0-9._\n-' '-')
  printf '%s{"file":"%s","name":"%s"}' "$sep" "$s" "$safe"
  sep=","
done
printf ']\n'
