#!/usr/bin/env bash
# Accepts new baselines from a pull request (the action's `accept` mode, started by the label
# `loragate:accept-baselines`): reruns the suites writing pending baselines (explicitly: GitHub
# sets CI=true, which would otherwise mean `never`), accepts them, commits and pushes them to
# the PR branch, and starts the gate again on that commit (a push made with the workflow's own
# token starts no workflow). A run whose checks fail accepts nothing.
#
# Inputs (environment): LORAGATE_SUITES (files, one a line or space separated), LORAGATE_DEVICE, HEAD_REF (the
# PR branch), LORAGATE_WORKFLOW (the calling workflow's file name), GH_TOKEN (for `gh`).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
mapfile -t suites < <(suite_list "${LORAGATE_SUITES:-}")
[ "${#suites[@]}" -gt 0 ] || { echo "::error::no suites to accept"; exit 2; }
[ -n "${HEAD_REF:-}" ] || { echo "::error::HEAD_REF (the pull request's branch) is not set"; exit 2; }
for s in "${suites[@]}"; do
  # A failing run exits 1 here, and nothing is accepted.
  loragate suite "$s" --device "${LORAGATE_DEVICE:-cpu}" --update-baselines pending
  loragate baseline accept "$s"
done
git config user.name "loragate-bot"
git config user.email "loragate-bot@users.noreply.github.com"
git add baselines
if git diff --cached --quiet; then
  echo "nothing new to accept"
else
  git commit -q -m "Accept new LoRA baselines"
  git push origin "HEAD:$HEAD_REF"
fi
if [ -n "${LORAGATE_WORKFLOW:-}" ]; then
  gh workflow run "$LORAGATE_WORKFLOW" --ref "$HEAD_REF" -f suites="$(printf '%s\n' "${suites[@]}")"
  echo "started $LORAGATE_WORKFLOW on $HEAD_REF"
fi
