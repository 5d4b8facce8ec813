#!/usr/bin/env bash
# GPU acceptance (issue 20): scripts/gpu_acceptance.sh [--cpu] [A] [B] [C]   (default: A C)
#   A  ~3 min: every CUDA-only path, each a comparison with a tolerance; 2 gloo ranks on the GPU, 1 NCCL rank
#   B  ~8 min: pipeline.bench rows of the paper's NCSN++ at batch 512 (CD, CT, 1-step sampling, 50k + features)
#   C  ~7 min: mini CIFAR-10 teacher -> CD -> CT through the stage CLIs, FID-10k per row
# Each part runs under `timeout` at its cap (CAP_A, CAP_B, CAP_C seconds). Lines PASS/FAIL/SKIP/FIGURE go to the
# terminal and to $OUT/summary.md as they come ($OUT, else results/gpu/run-<date>; --cpu: a /tmp folder); at the
# end $OUT/<device>.md (and, on a GPU, results/gpu/<device>.md). A .gpu-pack/ folder (make gpu-pack) supplies
# clean-fid, the Inception weights and CIFAR-10 on a machine without them. --cpu: tiny sizes on this CPU.
# Exit status 1 if any line FAILs.
# See docs/gpu-acceptance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

cpu=()
parts=()
for arg in "$@"; do
    case $arg in
        --cpu) cpu=(--cpu) ;;
        A | B | C) parts+=("$arg") ;;
        -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $arg (expected --cpu, A, B, C)" >&2; exit 2 ;;
    esac
done
[ ${#parts[@]} -gt 0 ] || parts=(A C)

if [ -n "${PYTHON:-}" ]; then :
elif [ -x .venv/bin/python ]; then PYTHON=$ROOT/.venv/bin/python
else PYTHON=python3
fi

stamp=$(date -u +%Y%m%d-%H%M%S)
if [ ${#cpu[@]} -gt 0 ]; then OUT=${OUT:-${TMPDIR:-/tmp}/gpu-acceptance-cpu-$stamp}  # results/ is for GPU runs
else OUT=${OUT:-results/gpu/run-$stamp}
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.md

# What the pack brings, unless the machine has it already (or the caller set it).
PACK=${GPU_PACK:-$ROOT/.gpu-pack}
if [ -d "$PACK" ]; then
    if ! "$PYTHON" -c "import cleanfid" 2>/dev/null; then
        site=${TMPDIR:-/tmp}/gpu-acceptance-site
        wheel=$(ls "$PACK"/clean_fid-*.whl)
        "$PYTHON" -m pip install -q --no-index --no-deps --target "$site" "$wheel" 2>/dev/null \
            || "$PYTHON" -m zipfile -e "$wheel" "$site"  # a wheel is a zip: no pip needed
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if [ -f "$PACK/inception-fp16.pt" ]; then
        export INCEPTION_WEIGHTS=${INCEPTION_WEIGHTS:-$PACK/inception-fp16.pt}
    fi
    if [ -f "$PACK/cifar10.tar.gz" ] && [ ${#cpu[@]} -eq 0 ]; then  # --cpu: a synthetic set (decoding 60k is slow)
        export CIFAR10_SOURCE=${CIFAR10_SOURCE:-$PACK/cifar10.tar.gz}
    fi
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

# Caps (seconds) per part; parts B and C stop their own work 30 s before theirs so that they report.
declare -A CAP=([A]=${CAP_A:-240} [B]=${CAP_B:-480} [C]=${CAP_C:-450})
if [ ${#cpu[@]} -gt 0 ]; then CAP=([A]=${CAP_A:-400} [B]=${CAP_B:-300} [C]=${CAP_C:-400}); fi

{
    echo "# scripts/gpu_acceptance.sh ${cpu[*]} ${parts[*]}"
    echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
        "INCEPTION_WEIGHTS=${INCEPTION_WEIGHTS:-unset} CIFAR10_SOURCE=${CIFAR10_SOURCE:-unset}"
} >> "$SUMMARY"

for part in "${parts[@]}"; do
    cap=${CAP[$part]}
    echo "== part $part (cap ${cap} s)" | tee -a "$SUMMARY"
    start=$SECONDS
    rc=0
    timeout --kill-after=20 "$cap" "$PYTHON" -m pipeline.acceptance "$part" "${cpu[@]}" --out "$OUT" \
        --budget $((cap - 30)) 2> "$OUT/$part.log" || rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "FAIL part_$part: killed at its ${cap} s cap (the lines above are what finished)" | tee -a "$SUMMARY"
    elif [ "$rc" -ne 0 ]; then
        echo "FAIL part_$part: exit $rc: $(tail -n 1 "$OUT/$part.log")" | tee -a "$SUMMARY"
    fi
    echo "FIGURE part_$part: $((SECONDS - start)) s" | tee -a "$SUMMARY"
done

report=$("$PYTHON" -m pipeline.acceptance report "${cpu[@]}" --out "$OUT")
if [ ${#cpu[@]} -eq 0 ] && [ "$(basename "$report")" != cpu.md ]; then  # a GPU's report is kept in the repository
    mkdir -p results/gpu
    cp "$report" results/gpu/
fi
echo "wrote $SUMMARY and $report"
! grep -q '^FAIL ' "$SUMMARY"
