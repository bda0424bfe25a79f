#!/bin/bash
# The issue-10 GPU check as one script, on a machine with one CUDA GPU.
#   benchmarks/gpu_check.sh smoke OUT          GPU unit test and a tiny cache/stream training run (synthetic data)
#   benchmarks/gpu_check.sh full SHARDS OUT     benchmark table (batch 512 and 64), then honest 5-fold CV of
#                                               best.yaml, best.yaml at global batch 512 (lr 0.2, 60 epochs,
#                                               3 warm-up) and fast.yaml, each while time is left
# DEADLINE (seconds from start, default 540) stops starting new work that would not finish in time.
# VARIANTS="name|recipe|extra args;..." replaces the cross-validated list, e.g.
#   VARIANTS="big|best|--image-size 240,320;long|best|--epochs 48" benchmarks/gpu_check.sh full SHARDS OUT
# BENCH=0 skips the benchmark table.
set -u
stage=$1; shift
start=$(date +%s); deadline=${DEADLINE:-540}
left() { echo $(( deadline - ($(date +%s) - start) )); }
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, accelerate, webdataset; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'accelerate', accelerate.__version__, 'cpus', __import__('os').cpu_count())"
if [ "$stage" = smoke ]; then
  out=$1
  python3 -m pytest -q -p no:cacheprovider tests/test_data.py -k "gpu or distributions or augmentation_of_a_sample" 2>&1 | tail -4
  python3 - <<'PY'
from pathlib import Path
from bloodcells_dist.pack.synthetic import generate_dataset
from bloodcells_dist.pack.shards import PackOptions, pack_shards
generate_dataset(Path("/tmp/syn"), per_class=100, seed=0, copies=8, test_per_class=25)
pack_shards(Path("/tmp/syn"), Path("/tmp/syn-shards"), PackOptions(seed=0))
PY
  for data in cache stream; do
    timeout 120 python3 -m bloodcells_dist.train --shards /tmp/syn-shards --output-dir /tmp/smoke-$data --overwrite \
      --image-size 48,64 --widths 8,16,32,32 --hidden 64,32 --batch-size 32 --epochs 3 --tracker none \
      --data $data --workers 2 --cache-dir /tmp/cache 2>&1 | grep -E "^data:|precision|accuracy|Error|error" | head -8
    python3 -c "import json; r=json.load(open('/tmp/smoke-$data/final.json')); print('$data', 'final', r['final'])"
  done
  exit 0
fi
shards=$1; out=$2
for batch in $([ "${BENCH:-1}" = 1 ] && echo 512 64); do
  steps=$([ $batch = 512 ] && echo 12 || echo 100)
  [ "$(left)" -gt 60 ] && timeout $(( $(left) - 20 )) python3 benchmarks/bench_train.py --shards "$shards" \
    --batch-size $batch --steps $steps --rounds 2 --workers 12 --cache-dir /tmp/cache 2>&1 | tee "$out/bench-$batch.txt"
done
IFS=';' read -r -a variants <<< "${VARIANTS:-best|best|;b512|best|--batch-size 512 --lr 0.2 --epochs 60 --warmup-epochs 3;fast|fast|}"
for variant in "${variants[@]}"; do
  IFS='|' read -r recipe config extra <<< "$variant"
  [ "$(left)" -lt 60 ] && { echo "skipped $recipe: $(left) s left"; continue; }
  timeout $(( $(left) - 10 )) python3 -m bloodcells_dist cv --shards "$shards" --output-dir /tmp/cv-$recipe \
    --config launch/recipes/$config.yaml --tracker none --cache-dir /tmp/cache $extra 2>&1 | tail -12 | tee "$out/cv-$recipe.txt"
  cp /tmp/cv-$recipe/cv.json "$out/cv-$recipe.json" 2>/dev/null
  python3 - "$recipe" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(f"/tmp/cv-{sys.argv[1]}").glob("fold-*/final.json")):
    r = json.loads(f.read_text())
    print(f"{f.parent.name}: accuracy {r['final']['accuracy']:.4f} macro F1 {r['final']['macro_f1']:.4f} "
          f"({r['final']['samples']} held out), {r['epochs']} epochs in {r['train_seconds']:.1f} s = "
          f"{r['epochs'] * r['train_samples'] / r['train_seconds']:,.0f} img/s")
PY
done
echo "done with $(left) s left"
