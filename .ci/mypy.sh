#!/usr/bin/env bash
# Type-check the rmserve namespace as it installs (rmserve.X = service/X, rmserve.models.X = models/X):
# mypy cannot follow the editable install's import hook, so it reads a tree of links laid out as
# the installed package.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/rmserve"
for entry in "$repo"/service/*; do ln -s "$entry" "$tree/rmserve/$(basename "$entry")"; done
ln -s "$repo/models" "$tree/rmserve/models"
cd "$tree"
mypy --config-file "$repo/pyproject.toml" --cache-dir "$repo/.mypy_cache" -p rmserve --exclude 'rmserve/models' "$@"
