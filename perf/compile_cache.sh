#!/usr/bin/env bash
# Keep here the compile caches a device call sent back (perf/gpu_check.sh with SAVE_COMPILE_CACHE=1), so that later
# calls start warm: joins the call's parts into .compile_cache.tgz (git-ignored), which a call carries
# (carry [".whl", ".compile_cache.tgz"]) and gpu_check.sh unpacks before its stages.
#   bash perf/compile_cache.sh /work/.device/N     # the folder the call's files came back to
#   bash perf/compile_cache.sh --clear             # start cold again
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)  # (.git may be a file: a worktree)
grep -qx '/.compile_cache.tgz' "$exclude" 2>/dev/null || echo /.compile_cache.tgz >> "$exclude"
if [ "${1:-}" = --clear ]; then rm -f .compile_cache.tgz; echo "compile cache cleared"; exit 0; fi
dir=${1:?usage: perf/compile_cache.sh DEVICE_FILES_DIR | --clear}
parts=$(ls "$dir"/compile_cache.tgz.part* 2>/dev/null | sort) || true
if [ -z "$parts" ]; then echo "no compile_cache.tgz.part* in $dir (was SAVE_COMPILE_CACHE=1 set?)" >&2; exit 1; fi
cat $parts > .compile_cache.tgz.new
tar tzf .compile_cache.tgz.new > /dev/null  # whole and readable, or keep the old one
mv .compile_cache.tgz.new .compile_cache.tgz
echo "kept .compile_cache.tgz: $(du -h .compile_cache.tgz | cut -f1) ($(tar tzf .compile_cache.tgz | wc -l) entries)"
