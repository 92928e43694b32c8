#!/usr/bin/env bash
# The prepared GPU check (issue 19): in one run of under 8 minutes, on a machine with PyTorch + CUDA
# and no network, it installs moeconv from this working tree (pip, no network), builds and reports the
# CUDA extension, runs `pytest -m gpu`, runs compute-sanitizer memcheck over the native kernels, times
# the kernels on CUDA (decode T=1, prefill T=512/4096, SmolLM2 and 7B shapes, vs dense bf16 and
# torch._grouped_mm, plus copy bandwidth), converts, evaluates and heals the real SmolLM2 at (8,4) on
# CUDA and compares its perplexity with the same recipe converted and evaluated on the CPU (within 1%).
# Every step has its own timeout and the run goes on past failures; RESULTS gets every log and
# summary.json (each step's status, seconds and numbers), rewritten as each step ends.
#
#   bash benchmarks/gpu_check.sh RESULTS              # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run RESULTS    # anywhere: print the plan, validate its commands
#
# First, on the CPU machine, stage what the GPU machine lacks (model halves, wheels) into .stage/:
#   bash benchmarks/stage_gpu.sh
# Then two device calls (the model is 94 MiB and a call carries 64 MiB); make call 2 at once after
# call 1 returns, as the machine stays warm only 30 s and a cold one forgets part 1:
#   call 1: carry [".stage/part1"], timeout_s 120, command:
#           bash benchmarks/gpu_check.sh --place-part1
#   call 2: carry [".stage/part2"], timeout_s 600, command:
#           bash benchmarks/gpu_check.sh /tmp/gc; tar czf $OUT/gpu_check.tgz -C /tmp gc; cp /tmp/gc/summary.json $OUT/
# If part 1 was lost, the model steps say so (skipped) and the rest still runs.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
