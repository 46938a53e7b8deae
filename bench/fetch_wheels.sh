#!/bin/bash
# Fetches into .whl/ the wheels that bench/device_run.sh installs on the lent GPU machine, whose
# Python (3.12) has jax, flax and torch but not these; versions from constraints.txt. Run it here
# (PyPI is reachable from this machine, not from the GPU one), then pass carry=[".whl"] to `run`.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="segment-anything pycocotools ml_collections tensorflow-datasets dm-tree array_record
  immutabledict simple-parsing docstring_parser tensorflow-metadata termcolor toml
  googleapis-common-protos"

pin() {  # NAME==VERSION from constraints.txt ('-' and '_' alike), or exit naming the package
  grep -i -E "^${1//[-_]/[-_]}==" constraints.txt \
    || { echo "no pin for $1 in constraints.txt" >&2; exit 1; }
}

pins=()
for name in $PACKAGES; do
  pins+=("$(pin "$name")")
done
promise=$(pin promise)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any "${pins[@]}"
# promise has no wheel on PyPI: build one (pure Python).
python3 -m pip wheel -q --no-deps -w .whl "$promise"
ls .whl
