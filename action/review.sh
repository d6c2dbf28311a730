#!/usr/bin/env bash
# The `loragate review` check (the action's `review` mode): red while the merged reports have
# images or measurements nobody accepted yet, green once they are accepted.
#
# Inputs (environment): LORAGATE_MERGED (default merged).
set -euo pipefail
merged=${LORAGATE_MERGED:-merged}
if ! loragate review "$merged"; then
  echo "::error::images or measurements to review: open the loragate-report artifact, then add the label loragate:accept-baselines (or fix the LoRA)"
  exit 1
fi
