#!/usr/bin/env bash
# `buf breaking` on proto/ against the previous commit (on main: main's previous state), with the
# FILE rules of buf.yaml.
#
#   scripts/buf_breaking.sh BUF [REF]      (REF defaults to HEAD~1; BUF_AGAINST=REF works too)
#
# It skips, saying why, when there is nothing to compare with: no previous commit (a shallow or
# single-commit clone), or a previous commit whose proto/ does not build on its own (before the
# googleapis protos it imports were vendored under proto/google/api).
set -euo pipefail
cd "$(dirname "$0")/.."

buf=${1:?usage: scripts/buf_breaking.sh BUF [REF]}
ref=${2:-${BUF_AGAINST:-HEAD~1}}

if ! commit=$(git rev-parse --verify -q "$ref^{commit}"); then
  echo "buf breaking: skipped, no commit $ref to compare with (shallow or single-commit clone)"
  exit 0
fi
if ! git cat-file -e "$commit:proto/google/api/annotations.proto" 2>/dev/null; then
  echo "buf breaking: skipped, $ref ($commit) predates the vendored googleapis protos"
  exit 0
fi
# A worktree's .git is a file, which buf's git input does not read: point it at the common dir.
git_dir=$(git rev-parse --path-format=absolute --git-common-dir)
"$buf" breaking --against "$git_dir#ref=$commit"
echo "buf breaking: no breaking change since $ref ($commit)"
