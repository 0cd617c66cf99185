#!/usr/bin/env bash
# Every GPU check in one call (< 8 minutes on one H200): correctness of each precision/loader/
# compile combination on CUDA, the epoch-time ladder of vgg16_cifar on the real CIFAR-10 at
# batch 128, 256 and 512, then `--preset fast` for as many epochs as the time left allows.
# JSON goes to $OUT (the device tool's folder) or benchmarks/results/gpu_suite/.
#   bash benchmarks/gpu_suite.sh            # on the GPU machine (python3 with torch there)
#   bash benchmarks/gpu_suite.sh --smoke    # the same stages, tiny, on CPU: proves the script
# Data: .gpu_data/cifar10-jpeg.tar.gz (carried), else ../shared/data/cifar10-jpeg.tar.gz, else
# synthetic (said loudly in the summary).
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0; [ "${1:-}" = "--smoke" ] && smoke=1
PY=${PYTHON:-python3}; [ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
budget=${SUITE_BUDGET_S:-450}
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
if [ $smoke = 1 ]; then out=${OUT:-benchmarks/results/gpu_suite_smoke}; else out=${OUT:-benchmarks/results/gpu_suite}; fi
mkdir -p "$out"
tarball=""
for t in .gpu_data/cifar10-jpeg.tar.gz ../shared/data/cifar10-jpeg.tar.gz; do [ -f "$t" ] && { tarball=$t; break; }; done
if [ -n "$tarball" ]; then data="--dataset imagefolder --data-dir $tarball"; else data="--dataset synthetic --synthetic-size 8192"; fi
log() { echo "[suite +$(( $(date +%s) - start ))s] $*"; }
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
[ $smoke = 1 ] || nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv || true

log "1/3 correctness of precision x loader x compile on the device"
$PY benchmarks/device_checks.py --out "$out/device_checks.json"; checks=$?

log "1b/3 checkpoint stall: vgg16_cifar + Adam (4 GB), synchronous vs background save"
if [ $smoke = 1 ]; then ckmodel=vgg_truncated; else ckmodel=vgg16_cifar; fi
$PY benchmarks/checkpoint.py --model $ckmodel --repeats 2 --out "$out/checkpoint_${ckmodel}.json" \
  || log "checkpoint benchmark failed"

log "2/3 epoch-time ladder"
if [ $smoke = 1 ]; then
  model=small_cnn; steps=10; batches="64 128"; ladder_512="64"; edata="--dataset synthetic --data-dir data"
else
  model=vgg16_cifar; steps=40; batches="128 256 512"; ladder_512="512"; edata="--dataset imagefolder --data-dir $tarball"
  [ -n "$tarball" ] || edata="--dataset synthetic --data-dir data"
fi
for b in $batches; do
  # the full ladder at one batch size, the first and last rung at the others (compile time adds up)
  rungs="0,4"; [ "$b" = "$ladder_512" ] && rungs="0,1,2,3,4"
  if [ "$(left)" -lt 120 ]; then log "skipping batch $b: $(left)s left"; continue; fi
  $PY benchmarks/epoch_time.py --model $model --batch-size $b --steps-per-epoch $steps --epochs 2 \
      --rungs $rungs $edata --out "$out/epoch_time_${model}_bs$b.json" || log "epoch_time bs$b failed"
done

log "3/3 --preset fast for the time left ($(left)s)"
epochs=$($PY - "$out" "$ladder_512" "$(left)" "$smoke" <<'PYEOF'
import json, sys, pathlib
out, batch, left, smoke = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
if smoke:
    print(1); raise SystemExit
try:
    rungs = json.loads(next(out.glob(f"epoch_time_*_bs{batch}.json")).read_text())["rungs"]
    epoch_s = min(r["epoch_s_full"] for r in rungs) * 1.15 + 4  # + evaluation
except Exception:
    epoch_s = 20.0
print(max(0, min(12, int((left - 90) / epoch_s))))
PYEOF
)
if [ "$epochs" -gt 0 ]; then
  if [ $smoke = 1 ]; then
    fast="--preset fast --model small_cnn --batch-size 128 --dataset synthetic --synthetic-size 2048 --compile"
  else
    fast="--preset fast $data"
  fi
  $PY -m dist_cifar.train $fast --epochs "$epochs" --out-dir "$out/fast_run" --overwrite --checkpoint-every 0 --checkpoint-interval-min 0 \
      --no-save-best > "$out/fast_run.log" 2>&1 || log "fast run failed: $(tail -3 "$out/fast_run.log")"
  cp "$out/fast_run/metrics.jsonl" "$out/fast_metrics.jsonl" 2>/dev/null
  cp "$out/fast_run/summary.json" "$out/fast_summary.json" 2>/dev/null
  rm -rf "$out/fast_run"
else
  log "no time left for the fast preset"
fi
$PY - "$out" "$smoke" "$tarball" <<'PYEOF'
import json, sys, pathlib
sys.path.insert(0, "benchmarks")
from common import provenance, write_json
out, smoke, tarball = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
summary = {"benchmark": "gpu_suite", "smoke": smoke, "data": tarball or "synthetic", "provenance": provenance(["gpu_suite.sh"] + (["--smoke"] if smoke else []))}
for f in sorted(out.glob("epoch_time_*.json")):
    rungs = json.loads(f.read_text())["rungs"]
    best = max(rungs, key=lambda r: r["images_per_s"])
    summary[f.stem] = {"best_rung": best["rung"], "best_images_per_s": best["images_per_s"],
                       "best_epoch_s_full": best["epoch_s_full"], "speedup_over_first": best["images_per_s"] / rungs[0]["images_per_s"]}
if (out / "fast_summary.json").exists():
    s = json.loads((out / "fast_summary.json").read_text())
    summary["fast"] = {k: s.get(k) for k in ("test_accuracy", "epochs_run", "total_time_s", "mean_epoch_time_s")}
summary["device_checks_ok"] = json.loads((out / "device_checks.json").read_text()).get("all_ok") if (out / "device_checks.json").exists() else None
write_json(out / "suite_summary.json", summary)
print(json.dumps(summary, indent=2))
PYEOF
log "done in $(( $(date +%s) - start ))s"
exit $checks
