#!/usr/bin/env bash
# One script for a short GPU loan: build fastbn with CUDA in place, run the tests,
# run the CUDA benchmark. Needs torch (>= 2.5) with CUDA, and nvcc matching its CUDA.
#
#   bench/gpu_run.sh                 # build, test, sanitize, bench
#   bench/gpu_run.sh build test      # only some steps (e.g. to split across calls
#   bench/gpu_run.sh bench           #  that each have a time limit)
#   bench/gpu_run.sh lease           # all four, sized for one call on a lent GPU (below)
#
# lease: what one call of this workplace's device tool can hold (10 minutes a call,
# 15 minutes of device time a session, at most 8 files back): DEADLINE_S=540, the
# tests that run on the GPU (-k cuda, 60 s a test where pytest-timeout is installed),
# memcheck then racecheck for at most 75 s each, a 72-row benchmark capped at 120 s;
# the CPU kernels built at -O1; everything written to a scratch folder and packed into
# $OUT/gpu_results.tgz (one file) at the end, also when a step fails; wheels in .whl/
# installed first. Any knob below set in the environment wins.
#
# sanitize: tests/test_cuda.py under compute-sanitizer --tool memcheck and --tool
# racecheck, checking fastbn's kernels only: the out-of-bounds accesses and
# shared-memory races on real hardware that CPU emulation (scripts/test-cuda-emulated.sh)
# cannot see. Its logs are sanitizer-memcheck.log and sanitizer-racecheck.log.
#
# Everything (logs, JSON, PNG, markdown) goes to ${OUT:-bench/results}.
# A failed build stops the script; failing tests do not stop the benchmark, their
# exit code is reported at the end (and becomes the script's exit code).
#
# Environment knobs:
#   PYTHON=python3            interpreter with torch
#   CUDA_HOME=/usr/local/cuda toolkit to build with
#   TORCH_CUDA_ARCH_LIST      default: the visible GPU's compute capability only (faster build)
#   FASTBN_QUICK_CPU_KERNELS  1 (lease's default): the CPU kernels at -O1 (setup.py), which cut
#                             the lease build from 443 s to 171 s on an H200 machine (2026-12-04)
#   MAX_JOBS                  parallel compile jobs (default: number of CPUs)
#   FASTBN_BUILD=inplace|pip  `setup.py build_ext --inplace` (default) or `pip install -e .`
#   PYTEST_ARGS="-q"          arguments for pytest (after the tests folder)
#   BENCH_ARGS=""             extra arguments for `python -m bench` (e.g. --quick)
#   SANITIZE_PYTEST_ARGS      pytest selection for the sanitizer runs
#                             (default: tests/test_cuda.py without the >2^31-element case)
#   SANITIZE_TOOLS            default "memcheck racecheck"
#   DEADLINE_S                seconds the whole script may take (default: no limit): a lent
#                             GPU's call has a hard limit, and what is killed at it returns
#                             nothing. Each step then stops in time for the summary, and the
#                             steps after a step that used the time up are skipped.
#   TEST_TIMEOUT_S, SANITIZE_TIMEOUT_S, BENCH_TIMEOUT_S
#                             a cap on one step (for each sanitizer tool) within DEADLINE_S
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test sanitize bench)
if [ "${steps[*]}" = "lease" ]; then
    steps=(build test sanitize bench)
    export DEADLINE_S="${DEADLINE_S:-540}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHONUNBUFFERED=1
    export TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-150}" SANITIZE_TIMEOUT_S="${SANITIZE_TIMEOUT_S:-75}"
    export BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-120}"
    # The CPU kernels at -O1: at -O3 their four per-ISA compiles took 443 s of a 540 s lease
    # (2026-12-04), and nothing on the GPU times them.
    export FASTBN_QUICK_CPU_KERNELS="${FASTBN_QUICK_CPU_KERNELS:-1}"
    per_test_limit=""
    "$PYTHON" -c "import pytest_timeout" 2>/dev/null && per_test_limit="--timeout 60"
    export PYTEST_ARGS="${PYTEST_ARGS:--q -k cuda -p no:cacheprovider -rfE $per_test_limit}"
    export BENCH_ARGS="${BENCH_ARGS:---case train_fwd_bwd,eval_fwd --shape 64,256,56,56 --min-run-time 0.05 --rounds 2}"
    # Test-only packages a machine's image may lack (expecttest, for torch's test
    # database), carried as wheels in .whl/ (ignored by git; see bench/NOTES.md).
    if compgen -G ".whl/*.whl" > /dev/null; then
        wheels_site="$(mktemp -d)"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$wheels_site" .whl/*.whl \
            && export PYTHONPATH="$wheels_site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # One file back: a scratch folder, packed into the real OUT on the way out.
    packed_out="$OUT/gpu_results.tgz"
    OUT="$(mktemp -d)/gpu_results"
    mkdir -p "$OUT"
    trap 'tar czf "$packed_out" -C "$(dirname "$OUT")" gpu_results && echo "== gpu_run: results in $packed_out"' EXIT
fi

# Seconds the next step may run: its cap, within what DEADLINE_S leaves (15 s kept for
# the summary); 0 when nothing is left.
step_limit() {
    local cap="${1:-0}" left
    if [ -n "${DEADLINE_S:-}" ]; then
        left=$((DEADLINE_S - SECONDS - 15))
        [ "$left" -lt 0 ] && left=0
        if [ "$cap" = 0 ] || [ "$cap" -gt "$left" ]; then cap=$left; [ "$cap" = 0 ] && { echo 0; return; }; fi
    fi
    [ "$cap" = 0 ] && cap=86400  # no limit asked for
    echo "$cap"
}
# Runs "$@" for at most $1 seconds (exit code 124 when stopped there).
limited() { local seconds=$1; shift; timeout --kill-after=10 "$seconds" "$@"; }

wants() { local step; for step in "${steps[@]}"; do [ "$step" = "$1" ] && return 0; done; return 1; }
say() { echo "== gpu_run: $*" | tee -a "$OUT/gpu_run.log"; }

say "$(date -u +%FT%TZ) steps: ${steps[*]}; repo $(git describe --always --dirty 2>/dev/null || echo '?'); OUT=$OUT"
{
    nvidia-smi || echo "nvidia-smi failed"
    "$CUDA_HOME/bin/nvcc" --version || echo "no nvcc under $CUDA_HOME"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available(), 'cudnn', torch.backends.cudnn.version())"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

build_status="not run"
if wants build; then
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        # Only the GPU in this machine: a build for one architecture takes half the time.
        TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')" \
            || { say "cannot query the GPU's compute capability"; exit 1; }
        export TORCH_CUDA_ARCH_LIST
    fi
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    say "building (${FASTBN_BUILD:-inplace}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS), log: $OUT/build.log"
    start=$SECONDS
    if [ "${FASTBN_BUILD:-inplace}" = "pip" ]; then
        # --no-deps: torch and numpy are there already, and the machine may have no network.
        build_command=("$PYTHON" -m pip install -v --no-build-isolation --no-deps -e .)
    else
        build_command=("$PYTHON" setup.py build_ext --inplace)
    fi
    if ! limited "$(step_limit 0)" "${build_command[@]}" > "$OUT/build.log" 2>&1; then
        tail -n 60 "$OUT/build.log"
        say "BUILD FAILED (${build_command[*]}), stopping"
        exit 1
    fi
    # setup.py falls back to a CPU-only build when torch or nvcc lack CUDA; here that is an error.
    if grep -q "building CPU-only" "$OUT/build.log"; then
        grep "fastbn:" "$OUT/build.log"
        say "BUILD FAILED: the extension was built without CUDA, stopping"
        exit 1
    fi
    say "built in $((SECONDS - start)) s: $(ls fastbn/_C*.so 2>/dev/null | tr '\n' ' ')"
    # The smallest check that the CUDA kernels load and run, before spending time on tests.
    if ! "$PYTHON" - > "$OUT/smoke.log" 2>&1 <<'EOF'
import os
os.environ["FASTBN_CUDA_KERNELS"] = "1"  # fastbn's kernels, not the torch fallback of unvalidated builds
import torch, fastbn, fastbn.functional
x = 3 + 2 * torch.randn(4, 3, 5, 5, device="cuda")
mean, var = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
y = fastbn.functional.batch_norm(x, mean.clone(), var.clone(), training=True)
reference = torch.nn.functional.batch_norm(x, mean.clone(), var.clone(), training=True)
error = (y - reference).abs().max().item()
print("fastbn CUDA smoke run, max |fastbn - torch| =", error)
assert error < 1e-4, error
EOF
    then
        cat "$OUT/smoke.log"
        say "BUILD FAILED: fastbn does not run on CUDA (see $OUT/smoke.log), stopping"
        exit 1
    fi
    cat "$OUT/smoke.log"
    build_status="ok"
fi

pytest_rc="not run"
if wants test; then
    limit=$(step_limit "${TEST_TIMEOUT_S:-0}")
    if [ "$limit" = 0 ]; then
        pytest_rc="skipped: DEADLINE_S reached"
    else
        say "pytest tests ${PYTEST_ARGS:--q} (at most $limit s), log: $OUT/pytest.log"
        # shellcheck disable=SC2086  # PYTEST_ARGS is meant to split into words
        limited "$limit" "$PYTHON" -m pytest tests ${PYTEST_ARGS:--q} 2>&1 | tee "$OUT/pytest.log"
        pytest_rc=${PIPESTATUS[0]}
        say "pytest exit code: $pytest_rc"
    fi
fi

sanitize_rc="not run"
if wants sanitize; then
    sanitizer="$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")"
    if [ -n "${SANITIZE_PYTEST_ARGS:-}" ]; then
        # shellcheck disable=SC2206  # SANITIZE_PYTEST_ARGS is meant to split into words
        sanitize_args=($SANITIZE_PYTEST_ARGS)
    else
        sanitize_args=(tests/test_cuda.py -k "not more_than_2_31")
    fi
    if [ ! -x "$sanitizer" ]; then
        say "compute-sanitizer not found (PATH, $CUDA_HOME/bin)"
        sanitize_rc="no compute-sanitizer"
    else
        sanitize_rc=0
        for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
            limit=$(step_limit "${SANITIZE_TIMEOUT_S:-0}")
            if [ "$limit" = 0 ]; then say "compute-sanitizer $tool skipped: DEADLINE_S reached"; sanitize_rc=124; continue; fi
            say "compute-sanitizer --tool $tool, pytest -q ${sanitize_args[*]} (at most $limit s), log: $OUT/sanitizer-$tool.log"
            # kns=fastbn: only fastbn's kernels (namespace fastbn::cuda), not torch's references
            limited "$limit" "$sanitizer" --tool "$tool" --kernel-name kns=fastbn --error-exitcode 97 \
                --target-processes all "$PYTHON" -m pytest -q "${sanitize_args[@]}" 2>&1 | tee "$OUT/sanitizer-$tool.log"
            rc=${PIPESTATUS[0]}
            say "compute-sanitizer $tool exit code: $rc"
            [ "$rc" = 0 ] || sanitize_rc=$rc
        done
    fi
fi

bench_rc="not run"
if wants bench; then
    limit=$(step_limit "${BENCH_TIMEOUT_S:-0}")
    if [ "$limit" = 0 ]; then
        bench_rc="skipped: DEADLINE_S reached"
    else
        say "benchmark (at most $limit s), tables: $OUT/bench-cuda.md, progress: $OUT/bench-cuda.log"
        # shellcheck disable=SC2086  # BENCH_ARGS is meant to split into words
        limited "$limit" "$PYTHON" -m bench --device cuda --json "$OUT/bench-cuda.json" --plot "$OUT/bench-cuda.png" \
            ${BENCH_ARGS:-} 2> "$OUT/bench-cuda.log" | tee "$OUT/bench-cuda.md"
        bench_rc=${PIPESTATUS[0]}
        [ "$bench_rc" = 0 ] || tail -n 30 "$OUT/bench-cuda.log"
        say "benchmark exit code: $bench_rc"
    fi
fi

say "summary: build $build_status, pytest exit code $pytest_rc, compute-sanitizer exit code $sanitize_rc," \
    "benchmark exit code $bench_rc" | tee "$OUT/summary.txt"
for rc in "$pytest_rc" "$sanitize_rc" "$bench_rc"; do
    case "$rc" in "no compute-sanitizer" | skipped*) rc=1 ;; esac
    if [ "$rc" != "not run" ] && [ "$rc" != 0 ]; then exit "$rc"; fi
done
exit 0
