#!/usr/bin/env bash
# On a machine with NVIDIA GPUs: compare nembo-agent's NVML readings with
# nvidia-smi (idle and under a matmul load), and run one job through the whole
# zero-config stack there. Usage: scripts/device-gpu-check.sh BIN_DIR OUT_DIR
set -u
bin=$(cd "$1" && pwd); out=$2; mkdir -p "$out"
fields=index,name,uuid,pci.bus_id,driver_version,memory.total,memory.used,memory.free,utilization.gpu,utilization.memory,temperature.gpu,power.draw,power.limit,clocks.sm,clocks.mem,mig.mode.current,ecc.errors.corrected.volatile.total,ecc.errors.uncorrected.volatile.total,clocks_throttle_reasons.active
{
  uname -srm; head -2 /etc/os-release; ldd --version | head -1
  nvidia-smi -L
  echo "== idle"
  "$bin/nembo-agent" --probe-gpus > "$out/probe-idle.json"; echo "probe rc=$?"
  nvidia-smi --query-gpu=$fields --format=csv,nounits > "$out/smi-idle.csv"
  cat "$out/probe-idle.json" "$out/smi-idle.csv"
  echo "== under load"
  python3 - <<'PY' &
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn_like(a)
t = time.time()
while time.time() - t < 12:
    c = a @ b
torch.cuda.synchronize()
PY
  sleep 7
  "$bin/nembo-agent" --probe-gpus > "$out/probe-load.json" &
  nvidia-smi --query-gpu=$fields --format=csv,nounits > "$out/smi-load.csv"
  wait
  cat "$out/probe-load.json" "$out/smi-load.csv"
  echo "== whole stack, zero config"
  export HOME=$(mktemp -d)
  printf 'name: real-gpu\nrun: nvidia-smi --query-gpu=name,memory.total --format=csv,noheader\n' > /tmp/real-gpu.yaml
  start=$(date +%s%N)
  "$bin/nembo" launch /tmp/real-gpu.yaml; echo "launch rc=$? in $(( ($(date +%s%N) - start) / 1000000 )) ms (includes starting the coordinator)"
  "$bin/nembo" launch /tmp/real-gpu.yaml >/dev/null 2>&1
  start=$(date +%s%N)
  "$bin/nembo" launch /tmp/real-gpu.yaml; echo "warm launch rc=$? in $(( ($(date +%s%N) - start) / 1000000 )) ms"
  "$bin/nembo" status
  "$bin/nembo" local down
} 2>&1 | tee "$out/log.txt"
