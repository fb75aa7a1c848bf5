#!/usr/bin/env bash
# Download the wheels of benchmarks/gpu_wheels.txt for the lent GPU machine (CPython 3.12,
# x86-64 Linux, no network) into one folder (default .whl, git-ignored), which the device
# call carries and benchmarks/gpu_check.py installs with --no-index --no-deps.
#
#     benchmarks/gpu_wheels.sh [FOLDER]        # make gpu-wheels
#
# A package published only as a source archive (connection-pool) is built into a wheel here
# (pure Python). Stops when the folder exceeds the budget: the device call carries at most
# 64 MiB, the working tree included.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
folder=${1:-$here/../.whl}
python=${PYTHON:-python3}
budget_mib=${BUDGET_MIB:-56}
# The GPU machine's Python; PY_VERSION=3.11 fetches for this machine's, to rehearse the install.
py_version=${PY_VERSION:-3.12}
mkdir -p "$folder"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_24_x86_64 any; do
    platforms+=(--platform "$p")
done
grep -v '^#' "$here/gpu_wheels.txt" | while read -r requirement; do
    [ -n "$requirement" ] || continue
    if ! "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py_version" \
            --implementation cp "${platforms[@]}" -d "$folder" "$requirement" 2>/dev/null; then
        echo "gpu_wheels: $requirement has no wheel for CPython $py_version: building one" >&2
        "$python" -m pip wheel --quiet --no-deps -w "$folder" "$requirement"
    fi
done
listed=$(grep -cv '^#' "$here/gpu_wheels.txt")
wheels=$(find "$folder" -maxdepth 1 -type f -name '*.whl' | wc -l)
size=$(du -sm "$folder" | cut -f1)
echo "gpu_wheels: $wheels wheels for $listed packages in $folder, $size MiB"
if [ "$wheels" -ne "$listed" ]; then
    echo "gpu_wheels: expected one wheel per package: remove $folder and run again" >&2
    exit 1
fi
if [ "$size" -gt "$budget_mib" ]; then
    echo "gpu_wheels: over the $budget_mib MiB budget (the device call carries 64 MiB)" >&2
    exit 1
fi
