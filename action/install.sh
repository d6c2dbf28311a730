#!/usr/bin/env bash
# Puts the loragate binary on the PATH of a GitHub Actions job (the action's first step).
#
#   install.sh --resolve   # writes version=, key=, dir= to $GITHUB_OUTPUT (for actions/cache)
#   install.sh             # makes sure the binary is in that dir, verified, and on $GITHUB_PATH
#
# Inputs (environment):
#   LORAGATE_VERSION       latest (default), a release tag (v0.2.0), or `source`: build the
#                          checked-out repository (loragate's own CI; needs a Rust toolchain)
#   LORAGATE_DEVICE        cpu (default) or cuda: which release binary
#   LORAGATE_REPOSITORY    owner/name whose releases to use (default: the action's own repository)
#   LORAGATE_RELEASES_URL  where release assets are downloaded from
#                          (default https://github.com/<repository>/releases/download)
# Release assets (.github/workflows/release.yml): loragate-x86_64-linux.tar.gz,
# loragate-cuda-x86_64-linux.tar.gz and SHA256SUMS; a download that does not match its sum is
# refused.
set -euo pipefail
version=${LORAGATE_VERSION:-latest}
device=${LORAGATE_DEVICE:-cpu}
repo=${LORAGATE_REPOSITORY:-${GITHUB_ACTION_REPOSITORY:-}}
out=${GITHUB_OUTPUT:-/dev/null}
case "$device" in
  cpu) asset=loragate-x86_64-linux.tar.gz ;;
  cuda) asset=loragate-cuda-x86_64-linux.tar.gz ;;
  *) echo "::error::device must be cpu or cuda, not \`$device\`"; exit 2 ;;
esac

if [ "$version" = latest ]; then
  [ -n "$repo" ] || { echo "::error::no repository to find the latest release of: set LORAGATE_REPOSITORY"; exit 2; }
  # The tag the latest release has now, so the cache key names a fixed version.
  auth=()
  [ -n "${GITHUB_TOKEN:-}" ] && auth=(-H "Authorization: Bearer $GITHUB_TOKEN")
  version=$(curl -fsSL "${auth[@]}" "${GITHUB_API_URL:-https://api.github.com}/repos/$repo/releases/latest" | jq -r .tag_name) \
    || { echo "::error::cannot find the latest release of $repo: pin a version (version: v0.1.0)"; exit 3; }
fi
case "$version" in
  source) dir="${RUNNER_TEMP:-/tmp}/loragate-source-$device" ;;
  *[!A-Za-z0-9._-]*|'') echo "::error::version \`$version\` is not a release tag, latest or source"; exit 2 ;;
  *) dir="${RUNNER_TOOL_CACHE:-${RUNNER_TEMP:-/tmp}}/loragate/$version-$device" ;;
esac

if [ "${1:-}" = --resolve ]; then
  {
    echo "version=$version"
    echo "dir=$dir"
    echo "key=loragate-$version-$device-${RUNNER_OS:-Linux}-${RUNNER_ARCH:-X64}"
    # A source build is cached by cargo, not by this key.
    [ "$version" = source ] && echo "cacheable=false" || echo "cacheable=true"
  } >>"$out"
  exit 0
fi

mkdir -p "$dir"
if [ "$version" = source ]; then
  features=()
  [ "$device" = cuda ] && features=(--features cudnn)
  (cd "${GITHUB_WORKSPACE:-.}" && cargo build --release --locked "${features[@]}")
  cp "${GITHUB_WORKSPACE:-.}/target/release/loragate" "$dir/loragate"
elif [ ! -x "$dir/loragate" ]; then
  base=${LORAGATE_RELEASES_URL:-https://github.com/$repo/releases/download}
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  curl -fsSL -o "$work/$asset" "$base/$version/$asset" || { echo "::error::cannot download $asset of loragate $version from $base"; exit 3; }
  curl -fsSL -o "$work/SHA256SUMS" "$base/$version/SHA256SUMS" || { echo "::error::cannot download SHA256SUMS of loragate $version"; exit 3; }
  (cd "$work" && grep -E "  $asset\$" SHA256SUMS | sha256sum -c --status) \
    || { echo "::error::$asset does not match its SHA-256 sum in the release's SHA256SUMS: refusing it"; exit 3; }
  tar -xzf "$work/$asset" -C "$dir"
  chmod +x "$dir/loragate"
fi
"$dir/loragate" --version >/dev/null || { echo "::error::$dir/loragate does not run on this machine"; exit 3; }
echo "$dir" >>"${GITHUB_PATH:-/dev/null}"
echo "path=$dir/loragate" >>"$out"
echo "loragate $("$dir/loragate" --version | awk '{print $2}') ($device) at $dir"
