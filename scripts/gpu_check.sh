#!/usr/bin/env bash
# The GPU check (under 8 minutes on an H100/H200-class GPU): the CUDA tests, bench.py on CUDA,
# the MNIST/Fashion-MNIST models to their accuracy, the CIFAR-10 ResNet preset's throughput
# on real-format synthetic data (real CIFAR-10 is not on these machines: its accuracy is only
# stated where it was measured on the real data set), and fused training (bench.py --fused)
# against its targets. Prints the time of each step.
#
#   bash scripts/gpu_check.sh            # from the repository root, regexp installed
set -euo pipefail
cd "$(dirname "$0")/.."
export REGEXP_DATA_DIR="${REGEXP_DATA_DIR:-../shared/data}" WANDB_MODE=disabled
out="${GPU_CHECK_OUT:-$(mktemp -d)}"
python - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: this check needs a GPU"
print("gpu:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
EOF

step() {  # step NAME COMMAND...: run it, print its wall time
    local name=$1 start
    shift
    start=$(date +%s.%N)
    "$@"
    printf '== %-28s %6.1f s\n' "$name" "$(echo "$(date +%s.%N) - $start" | bc)"
}

summary() {  # the metrics a check reports, from a run dir's summary.json
    python - "$1" <<'EOF'
import json, sys
s = json.load(open(f"{sys.argv[1]}/summary.json"))
m = s["metrics"]
print(f"   status {s['status']}  test/acc {m.get('test/acc', float('nan')):.4f}  "
      f"train {s['train_time_s']:.1f} s  {m['perf/samples_per_s']:,.0f} samples/s  ({s['epochs_completed']} epochs)")
EOF
}

step "pytest -m cuda" pytest -q -m cuda tests/test_cuda.py
step "bench.py --device cuda" python scripts/bench.py --device cuda --case all --repeats 3 --no-startup

# MNIST MLP: the time of one epoch; the 2-conv SimpleCNN (model=cnn): 99% on MNIST within seconds of training
step "mnist mlp, 2 epochs" regexp train device=cuda logger=none epochs=2 batch_size=512 hydra.run.dir="$out/mlp" >/dev/null
summary "$out/mlp"
step "mnist cnn (bf16)" regexp train device=cuda logger=none model=cnn device.precision=bf16 epochs=3 batch_size=256 \
    scheduler=onecycle optimizer.lr=3e-3 hydra.run.dir="$out/cnn" >/dev/null
summary "$out/cnn"
step "fashion-mnist cnn" regexp train device=cuda logger=none model=cnn dataset=fashion_mnist device.precision=bf16 \
    hydra.run.dir="$out/fashion" >/dev/null
summary "$out/fashion"

# CIFAR-10 ResNet preset on synthetic real-format data: throughput only (the labels are random)
python - "$out/cifar" <<'EOF'
import sys
from regexp.synthetic import write_cifar10
write_cifar10(sys.argv[1], per_batch=10000, n_test=10000)
EOF
step "resnet preset throughput" regexp train +experiment=resnet_cifar10 device=cuda logger=none device.precision=bf16 \
    dataset.root="$out/cifar" dataset.download=false epochs=2 hydra.run.dir="$out/resnet" >/dev/null
summary "$out/resnet"

# fused sweeps (hydra/launcher=fused's engine): N seeds trained side by side vs the same N jobs
# one after another, samples/s over all models; targets: 64 MLPs >= 20x, 16 SimpleCNNs >= 5x
fused_target() {  # fused_target JSON N TARGET: the bench's ratio at N against the target
    python - "$@" <<'EOF'
import json, sys
row = next(r for r in json.load(open(sys.argv[1]))["fused"]["rows"] if r["n"] == int(sys.argv[2]))
target = float(sys.argv[3])
print(f"   N={row['n']}: fused / sequential samples/s {row['ratio']:.1f}x (target >= {target:g}x: "
      f"{'met' if row['ratio'] >= target else 'MISSED'}); wall per job {row['wall_ratio']:.1f}x")
EOF
}
step "fused bench, 64 mlp seeds" python scripts/bench.py --device cuda --fused 64 --limit 12800 --repeats 1 \
    --save "$out/fused_mlp.json"
fused_target "$out/fused_mlp.json" 64 20
step "fused bench, 16 cnn seeds" python scripts/bench.py --device cuda --fused 16 --fused-model cnn --limit 12800 \
    --repeats 1 --save "$out/fused_cnn.json"
fused_target "$out/fused_cnn.json" 16 5
echo "run dirs: $out"
