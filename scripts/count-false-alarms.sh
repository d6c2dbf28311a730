#!/usr/bin/env bash
# How far the gate can be trusted, counted: the committed suites run against clean retrains of
# the committed recipe (other seeds: every failing check is a false alarm) and against LoRAs
# broken on purpose (a run that passes is a miss). docs/statistics.md quotes the table.
#
#   scripts/count-false-alarms.sh                 # every suite, every fixture LoRA
#   SUITES="hundred" scripts/count-false-alarms.sh
#
# The LoRAs (tests/fixtures/loras/README.md says how each was made):
#   clean:  zorb-seed2, zorb-seed3, zorb-seed4 (training/zorb-seed*.yaml)
#   broken: zorb-mislabeled (one background's images show another subject), zorb-bad
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release/loragate
out=${OUT:-out/false-alarms}
mkdir -p "$out"
export LORAGATE_CACHE=${LORAGATE_CACHE:-.loragate/cache}

printf '%-9s %-16s %-6s %5s %7s %5s  %s\n' suite lora kind exit review fail "failing checks"
for suite in ${SUITES:-portrait hundred}; do
  for entry in clean:zorb-seed2 clean:zorb-seed3 clean:zorb-seed4 broken:zorb-mislabeled broken:zorb-bad; do
    kind=${entry%%:*} lora=${entry#*:}
    log="$out/$suite-$lora.log"
    set +e
    COLUMNS=400 "$bin" suite "suites/$suite.yaml" --ci --lora "zorb=tests/fixtures/loras/$lora.safetensors" --out "$out/$suite-$lora" >"$log" 2>&1
    code=$?
    set -e
    summary=$(grep -E "^$suite: " "$log" | tail -1)
    review=$(sed -E 's/.* ([0-9]+) to review.*/\1/' <<<"$summary")
    failed=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$summary")
    checks=$(awk '$1 == "FAIL" {printf "%s%s·%s", sep, $2, $3; sep=", "}' "$log")
    printf '%-9s %-16s %-6s %5s %7s %5s  %s\n' "$suite" "$lora" "$kind" "$code" "$review" "$failed" "${checks:--}"
  done
done
