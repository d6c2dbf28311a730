#!/usr/bin/env bash
# Merges the run jobs' reports (the action's `report` mode): every suite's partitions into one
# report (HTML, JUnit, summary.md appended to the run page), all JUnit files into one, then fails
# when a run job failed: the `loragate gate` check is red on a regression.
#
# Inputs (environment): LORAGATE_ARTIFACTS (the downloaded artifacts, default artifacts),
# LORAGATE_MERGED (default merged), GATE_RESULT (the run jobs' result: success, failure,
# cancelled, skipped).
set -euo pipefail
command -v jq >/dev/null || { echo "::error::jq is needed to read the outcomes"; exit 3; }
artifacts=${LORAGATE_ARTIFACTS:-artifacts}
merged=${LORAGATE_MERGED:-merged}
mkdir -p "$merged"
mapfile -t outcomes < <(find "$artifacts" -name outcome.json -type f 2>/dev/null | sort)
mapfile -t names < <(for o in "${outcomes[@]}"; do jq -r .suite "$o"; done | sort -u)
for name in "${names[@]}"; do
  parts=()
  for o in "${outcomes[@]}"; do
    [ "$(jq -r .suite "$o")" = "$name" ] && parts+=("$(dirname "$o")")
  done
  # A failing suite still gets its merged report; the verdict comes from GATE_RESULT.
  loragate merge-report "${parts[@]}" -o "$merged/$name" || true
  if [ -n "${GITHUB_STEP_SUMMARY:-}" ] && [ -f "$merged/$name/summary.md" ]; then
    cat "$merged/$name/summary.md" >>"$GITHUB_STEP_SUMMARY"
  fi
done
mapfile -t junits < <(find "$merged" -mindepth 2 -name junit.xml -type f | sort)
if [ "${#junits[@]}" -gt 0 ]; then
  loragate merge-junit "${junits[@]}" -o "$merged/junit.xml"
fi
case "${GATE_RESULT:-success}" in
  success) echo "loragate gate: no regression in ${#names[@]} suites" ;;
  skipped) echo "loragate gate: nothing ran" ;;
  *)
    echo "::error::a LoRA suite failed (${GATE_RESULT}); the loragate-report artifact shows each image next to its baseline"
    exit 1
    ;;
esac
