#!/usr/bin/env bash
# Nsight Compute on our Triton kernels at Llama-3-8B shapes (launched by bench/ncu_kernels.py), one device call:
#
#   bash bench/ncu_kernels.sh [OUTDIR] [CASE ...]      (cases: loss dequant gemv fused decode elementwise)
#
# Writes OUTDIR/ncu.ncu-rep (open it in Nsight Compute), OUTDIR/ncu.csv (every metric of the sections below) and
# prints per kernel: duration, DRAM and SM throughput as % of the device's peak: what bounds it, at a glance.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results/ncu-$(date +%Y-%m-%d)}}"
shift || true
mkdir -p "$out"
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
kernels='regex:_rows_kernel|_nf4_dequant_kernel|_gemv_kernel|_fused_kernel|_paged_decode_kernel|_store_kv_kernel|_rms_norm_.*|_rope_kernel|_swiglu_.*'
timeout -k 10 "${NCU_S:-420}" ncu --profile-from-start off --kernel-name "$kernels" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    -f -o "$out/ncu" python3 bench/ncu_kernels.py "$@" > "$out/ncu.log" 2>&1
echo "ncu exit $? (log: $out/ncu.log)"
ncu --import "$out/ncu.ncu-rep" --csv --page details > "$out/ncu.csv" 2>> "$out/ncu.log" || exit 1
python3 - "$out/ncu.csv" <<'PY'
import csv, sys
from collections import defaultdict
rows = defaultdict(dict)
for r in csv.DictReader(open(sys.argv[1])):
    key = (r["ID"], r["Kernel Name"])
    rows[key][r["Metric Name"]] = (r["Metric Value"], r["Metric Unit"])
    rows[key]["Grid x Block"] = (f'{r.get("Grid Size", "?")} x {r.get("Block Size", "?")}', "")
want = ["Duration", "DRAM Throughput", "Memory Throughput", "Compute (SM) Throughput", "Achieved Occupancy",
        "Registers Per Thread", "Grid x Block"]
print("| id | kernel | " + " | ".join(want) + " |")
print("|---|---|" + "---|" * len(want))
for (i, name), m in sorted(rows.items(), key=lambda kv: int(kv[0][0])):
    cells = [" ".join(x for x in m.get(w, ("-", "")) if x) for w in want]
    print(f"| {i} | {name[:40]} | " + " | ".join(cells) + " |")
PY
