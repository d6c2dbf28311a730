#!/usr/bin/env bash
# Which suites a change affects: writes `suites=<JSON list>` and `files` (one a line) to
# $GITHUB_OUTPUT. Suites that changed, suites whose baselines changed, and suites that name a
# changed LoRA file; without a base commit (manual runs) the asked suites, or every suite. Each
# entry is {"file": path, "name": a name safe for artifact names (letters, digits, `-`, `_`,
# `.`: upload-artifact rejects `/`)}.
#
# Inputs (environment): BASE (the pull request's base commit), ASKED (suite files, one a line or
# space separated), SUITES_DIR (default suites).
set -euo pipefail
shopt -s nullglob
source "$(dirname "$0")/lib.sh"
dir=${SUITES_DIR:-suites}
all=("$dir"/*.yaml "$dir"/*.yml)
picked=()
if [ -n "${ASKED:-}" ]; then
  mapfile -t picked < <(suite_list "$ASKED")
elif [ -z "${BASE:-}" ]; then
  picked=("${all[@]}")
else
  mapfile -t changed < <(git diff --name-only "$BASE"...HEAD)
  for s in "${all[@]}"; do
    name=$(basename "$s" | sed -E 's/\.ya?ml$//')
    for c in "${changed[@]}"; do
      if [ "$c" = "$s" ] || [[ "$c" == "baselines/$name/"* ]] || { [[ "$c" == *.safetensors ]] && grep -qF "$(basename "$c")" "$s"; }; then
        picked+=("$s")
        break
      fi
    done
  done
fi
for s in "${picked[@]}"; do
  [ -f "$s" ] || { echo "::error::no suite file $s"; exit 2; }
done
json=$(jq -cn '$ARGS.positional | map({file: ., name: (split("/") | last | sub("\\.ya?ml$"; "") | gsub("[^A-Za-z0-9._-]"; "-"))})' --args "${picked[@]}")
{
  echo "suites=$json"
  # One a line (GitHub's multiline output syntax): file names may hold spaces.
  echo "files<<LORAGATE_FILES"
  printf '%s\n' "${picked[@]}"
  echo "LORAGATE_FILES"
} >>"${GITHUB_OUTPUT:-/dev/stdout}"
echo "affected suites: ${picked[*]:-none}"
