# Shared by the action's scripts (sourced, not run).

# Suite files from a list, one per line (what the plan job's `files` output holds). A line that
# is not a file is split at spaces, so `suites: a.yaml b.yaml` works too; a file name with a
# space in it stays whole on its own line.
suite_list() {
  local line w
  while IFS= read -r line; do
    [ -z "$line" ] && continue
    if [ -f "$line" ]; then
      printf '%s\n' "$line"
    else
      for w in $line; do printf '%s\n' "$w"; done
    fi
  done <<<"$1"
}

# A suite file's name, safe for artifact names (upload-artifact rejects `/`).
safe_name() {
  basename "$1" | sed -E 's/\.ya?ml$//' | tr -c 'A-Za-z0-9._\n-' '-'
}
