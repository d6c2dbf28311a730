#!/usr/bin/env bash
# Runs suites (the action's `run` mode): each suite into its own report folder, the counts as
# step outputs (failed, to-review, passed), the Markdown summaries appended to the run page,
# and a name for the artifact that is safe for upload-artifact (no `/`). Exits 0 even when a
# check failed, so the report is uploaded first; the action's last step fails the job then.
#
# Inputs (environment): LORAGATE_SUITES (files, one a line or space separated; default every
# suite under suites/), LORAGATE_DEVICE (cpu, cuda), LORAGATE_PARTITION (N/M or empty),
# LORAGATE_UPDATE_BASELINES (never by default: GitHub sets CI=true, and writing is always asked
# for explicitly), LORAGATE_OUT (default out/loragate).
set -euo pipefail
shopt -s nullglob
source "$(dirname "$0")/lib.sh"
command -v loragate >/dev/null || { echo "::error::loragate is not on the PATH (the install step puts it there)"; exit 3; }
command -v jq >/dev/null || { echo "::error::jq is needed to read the outcomes (install it on the runner)"; exit 3; }
if [ -n "${LORAGATE_SUITES:-}" ]; then
  mapfile -t suites < <(suite_list "$LORAGATE_SUITES")
else
  suites=(suites/*.yaml suites/*.yml)
fi
[ "${#suites[@]}" -gt 0 ] || { echo "::error::no suites to run: give the action's \`suites\` input"; exit 2; }
device=${LORAGATE_DEVICE:-cpu}
update=${LORAGATE_UPDATE_BASELINES:-never}
out=${LORAGATE_OUT:-out/loragate}
partition=${LORAGATE_PARTITION:-}
extra=()
part_name=all
if [ -n "$partition" ]; then
  [[ "$partition" =~ ^[0-9]+/[0-9]+$ ]] || { echo "::error::partition must be N/M, not \`$partition\`"; exit 2; }
  # A small suite may leave a partition empty: say so instead of failing.
  extra=(--partition "$partition" --no-checks warn)
  part_name=${partition%%/*}
fi
failed=0 review=0 passed=0 broken=0 names=()
for s in "${suites[@]}"; do
  name=$(safe_name "$s")
  names+=("$name")
  dest="$out/$name"
  set +e
  loragate suite "$s" --update-baselines "$update" --device "$device" "${extra[@]}" --out "$dest"
  code=$?
  set -e
  if [ "$code" -ge 2 ] || [ ! -f "$dest/outcome.json" ]; then
    echo "::error::loragate suite $s could not run (exit $code): see the log above"
    broken=$((broken + 1))
    continue
  fi
  f=$(jq '[.results[] | select(.status == "Failed" or .status == "Error")] | length' "$dest/outcome.json")
  r=$(jq '[.results[] | select(.status == "Review")] | length' "$dest/outcome.json")
  p=$(jq '[.results[] | select(.status == "Passed")] | length' "$dest/outcome.json")
  failed=$((failed + f)) review=$((review + r)) passed=$((passed + p))
done
artifact="loragate-$(IFS=+; echo "${names[*]}" | cut -c1-80)-$part_name"
{
  echo "failed=$((failed + broken))"
  echo "to-review=$review"
  echo "passed=$passed"
  echo "out=$out"
  echo "artifact=$artifact"
} >>"${GITHUB_OUTPUT:-/dev/stdout}"
echo "loragate: $passed passed, $review to review, $failed failed$([ "$broken" -gt 0 ] && echo ", $broken suites could not run")"
