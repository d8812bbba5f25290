#!/usr/bin/env bash
# `buf breaking` of the working tree's proto/ against another commit's (default: HEAD~1, the
# previous commit: in CI's clone of main that is main before the change being tested).
#
# Why not buf's own `--against '.git#ref=HEAD~1'`: our buf.yaml has two modules, proto/ and
# build/third_party (the googleapis protos copied out of a wheel by `make gen`, never
# committed), so the old commit checked out by buf has an empty third_party module and buf
# fails on it; with `subdir=proto` the google/* imports do not resolve. So the old proto/
# and buf.yaml come out of git here, beside this checkout's build/third_party.
#
# Usage: scripts/buf_breaking.sh BUF [REF]
set -euo pipefail
buf=$1
ref=${2:-HEAD~1}
cd "$(dirname "$0")/.."

if ! git rev-parse --git-dir >/dev/null 2>&1; then
  echo "buf breaking: SKIPPED, not a git checkout (nothing to compare against)"
  exit 0
fi
if ! git rev-parse --verify --quiet "$ref^{commit}" >/dev/null; then
  if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
    # A shallow clone has the commit's parent recorded but not fetched: try to get it.
    git fetch --quiet --deepen=1 2>/dev/null || true
  fi
  if ! git rev-parse --verify --quiet "$ref^{commit}" >/dev/null; then
    if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
      echo "buf breaking: SKIPPED, shallow clone without $ref and it could not be fetched" \
           "(clone with --depth 2 or more, or run 'git fetch --deepen=1')"
    else
      echo "buf breaking: SKIPPED, $ref does not exist (the first commit has nothing before it)"
    fi
    exit 0
  fi
fi
if [ -z "$(git ls-tree -d "$ref" proto)" ]; then
  echo "buf breaking: SKIPPED, $ref has no proto/ to compare against"
  exit 0
fi

against=build/buf-against
rm -rf "$against"
mkdir -p "$against/build"
git archive "$ref" proto buf.yaml | tar -x -C "$against"
cp -r build/third_party "$against/build/third_party"
"$buf" breaking --against "$against"
echo "buf breaking: no breaking change against $ref ($(git rev-parse --short "$ref"))"
