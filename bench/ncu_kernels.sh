#!/usr/bin/env bash
# Nsight Compute on our Triton kernels at Llama-3-8B shapes (launched by bench/ncu_kernels.py), one device call:
#
#   bash bench/ncu_kernels.sh [OUTDIR] [CASE ...]  (cases: loss dequant gemv fused fused_decode decode elementwise)
#
# Writes OUTDIR/ncu.ncu-rep (open it in Nsight Compute), OUTDIR/ncu.csv (every metric of the sections below) and
# prints per kernel: duration, DRAM and SM throughput as % of the device's peak, issue slots, and the three largest
# reasons warps stalled (warps stalled per issued instruction): what bounds it, at a glance.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results/ncu-$(date +%Y-%m-%d)}}"
shift || true
mkdir -p "$out"
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
kernels='regex:_rows_kernel|_nf4_dequant_kernel|_gemv_kernel|_gemv_blocks_kernel|_fused_kernel|_paged_decode_kernel|_store_kv_kernel|_rms_norm_.*|_rope_kernel|_swiglu_.*'
timeout -k 10 "${NCU_S:-420}" ncu --profile-from-start off --kernel-name "$kernels" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section SchedulerStats --section WarpStateStats \
    -f -o "$out/ncu" python3 bench/ncu_kernels.py "$@" > "$out/ncu.log" 2>&1
echo "ncu exit $? (log: $out/ncu.log)"
ncu --import "$out/ncu.ncu-rep" --csv --page details > "$out/ncu.csv" 2>> "$out/ncu.log" || exit 1
ncu --import "$out/ncu.ncu-rep" --csv --page raw > "$out/ncu-raw.csv" 2>> "$out/ncu.log" || true
python3 - "$out/ncu.csv" "$out/ncu-raw.csv" <<'PY'
import csv, re, sys
from collections import defaultdict
rows = defaultdict(dict)
for r in csv.DictReader(open(sys.argv[1])):
    key = (r["ID"], r["Kernel Name"])
    rows[key][r["Metric Name"]] = (r["Metric Value"], r["Metric Unit"])
    rows[key]["Grid x Block"] = (f'{r.get("Grid Size", "?")} x {r.get("Block Size", "?")}', "")
want = ["Duration", "DRAM Throughput", "Memory Throughput", "Compute (SM) Throughput", "Achieved Occupancy",
        "Registers Per Thread", "Issued Warp Per Scheduler", "Warp Cycles Per Issued Instruction", "Grid x Block"]
# stall reasons from the raw page (WarpStateStats' metrics): warps stalled per issued instruction, by reason
stall = re.compile(r"^smsp__average_warps?_(?:latency_)?issue_stalled_(\w+?)_per_issue_active\.ratio$")
stalls = defaultdict(list)
try:
    raw = list(csv.reader(open(sys.argv[2])))
    for r in raw[2:]:
        rec = dict(zip(raw[0], r))
        for key, value in rec.items():
            m = stall.match(key)
            if m and m.group(1) not in ("selected", "not_selected"):
                try:
                    stalls[rec.get("ID")].append((float(value.replace(",", "")), m.group(1)))
                except ValueError:
                    pass
except (OSError, IndexError):
    pass
print("| id | kernel | " + " | ".join(want) + " | top stalls (warps per issue) |")
print("|---|---|" + "---|" * (len(want) + 1))
for (i, name), m in sorted(rows.items(), key=lambda kv: int(kv[0][0])):
    cells = [" ".join(x for x in m.get(w, ("-", "")) if x) for w in want]
    top = ", ".join(f"{n} {v:.2f}" for v, n in sorted(stalls.get(i, []), reverse=True)[:3]) or "-"
    print(f"| {i} | {name[:40]} | " + " | ".join(cells) + f" | {top} |")
PY
