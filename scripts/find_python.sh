#!/usr/bin/env bash
# Print the path of a CPython interpreter of the given minor version (e.g. 3.12), or fail.
# Looks on PATH first, then in pyenv's versions (whose shims only answer for the versions
# pyenv has selected), then in uv's managed Pythons.
set -uo pipefail
want="${1:?usage: find_python.sh 3.X}"
check() { "$1" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$want'.split('.'))))" 2>/dev/null; }
candidates=("python$want")
root="${PYENV_ROOT:-$HOME/.pyenv}"
for dir in "$root"/versions/"$want".*/bin "$root"/versions/"$want"/bin \
           "$HOME"/.local/share/uv/python/cpython-"$want".*/bin; do
    [[ -d "$dir" ]] && candidates+=("$dir/python$want")
done
for candidate in "${candidates[@]}"; do
    path="$(command -v "$candidate" 2>/dev/null)" || continue
    if check "$path"; then
        echo "$path"
        exit 0
    fi
done
echo "error: no Python $want found (PATH, pyenv, uv)" >&2
exit 1
