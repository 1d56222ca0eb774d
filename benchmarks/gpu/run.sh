#!/usr/bin/env bash
# GPU figures of diffusers_ext in one command (under 8 minutes on one GPU, random weights at published sizes):
#   bash benchmarks/gpu/run.sh          # on a machine with a CUDA GPU
#   bash benchmarks/gpu/run.sh --tiny   # the same code on tiny pipelines on CPU, bf16 autocast included
# Sections (benchmarks/gpu/sections.py): device name; the trainer's own steps (build_trainables, training_step)
# for SD1.5 at 512 px and SDXL / Kolors at 1024 px (batch 1 and 4, bf16, gradient checkpointing, cached
# conditioning), UNets built on the device in bf16, with the meta-device rehearsal's peak beside
# torch.cuda.max_memory_allocated; processor vs diffusers' native gated UNet at SD1.5 (one copy of the
# weights); generate images/s without the adapter, with GLIGEN's schedule (the grounded steps named) and
# grounded on every step. Each section is its own process with its own time limit,
# so a failure (an out-of-memory, a crash) is reported and the others still run; a total time guard skips
# the sections that would start after the budget. Exit status: 0 when every section passed, else 1.
set -u
cd "$(dirname "$0")/../.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
TINY=""
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY="--tiny" ;;
    *) echo "unknown argument $arg; accepted: --tiny" >&2; exit 2 ;;
  esac
done
# on a GPU the sections fit in 450 s (each train section also rehearses its two runs on the CPU); --tiny on a
# shared CPU spends its time importing, so it gets more
if [ -n "$TINY" ]; then SCALE=4; export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; else SCALE=1; fi
BUDGET="${GPU_BENCH_BUDGET_S:-$((450 * SCALE))}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
START=$(date +%s)
FAILED=()
run_section() {  # name, per-section limit in seconds, command...
  local name="$1" limit=$(($2 * SCALE)); shift 2
  local now left
  now=$(date +%s); left=$((BUDGET - (now - START)))
  if [ "$left" -le 10 ]; then
    echo "=== $name: SKIPPED (total time guard: ${BUDGET} s spent)"; FAILED+=("$name (skipped)"); return
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "=== $name (limit ${limit} s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "=== $name: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))"; FAILED+=("$name")
  else
    echo "=== $name: ok, $(( $(date +%s) - t0 )) s"
  fi
}
run_section device 60 "$PY" -m benchmarks.gpu.sections device $TINY
run_section train-sd15 120 "$PY" -m benchmarks.gpu.sections train-sd15 $TINY
run_section train-sdxl 150 "$PY" -m benchmarks.gpu.sections train-sdxl $TINY
run_section train-kolors 150 "$PY" -m benchmarks.gpu.sections train-kolors $TINY
if [ -n "$TINY" ]; then
  run_section processor-vs-native 90 "$PY" -m benchmarks.bench_diffusers_spatial_adapter --unet tiny --latent 8 --batch 1 --repeats 1
else
  run_section processor-vs-native 90 "$PY" -m benchmarks.bench_diffusers_spatial_adapter --unet sd15 --latent 64 --batch 2 --repeats 5 --device cuda
fi
run_section generate-sd15 90 "$PY" -m benchmarks.gpu.sections generate-sd15 $TINY
echo "total $(( $(date +%s) - START )) s"
if [ "${#FAILED[@]}" -ne 0 ]; then
  echo "failed sections: ${FAILED[*]}"; exit 1
fi
echo "all sections passed"
