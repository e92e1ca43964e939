#!/usr/bin/env bash
# On a machine with NVIDIA GPUs: the agent's 1 Hz telemetry through the whole
# stack (zero-config local coordinator, a node whose agent loads the real
# NVML), read back with `nembo gpus --json` and /metrics beside nvidia-smi,
# idle and under a matmul load; then the agent's RSS and CPU over 60 s.
# Usage: scripts/device-telemetry-check.sh BIN_DIR OUT_DIR
set -u
bin=$(cd "$1" && pwd); out=$2; mkdir -p "$out"
fields=index,name,uuid,pci.bus_id,memory.used,memory.free,utilization.gpu,utilization.memory,temperature.gpu,power.draw,clocks.sm,clocks.mem,clocks_throttle_reasons.active
export HOME=$(mktemp -d)
snapshot() { # $1 = label
  "$bin/nembo" gpus --json > "$out/gpus-$1.json"
  nvidia-smi --query-gpu=$fields --format=csv,nounits > "$out/smi-$1.csv"
  curl -s "$(python3 -c 'import json,os;print(json.load(open(os.path.expanduser("~/.nembo/coordinator/api.json")))["metrics_url"])')" \
    | grep -E '^(DCGM_FI_DEV_(GPU_UTIL|FB_USED|GPU_TEMP|POWER_USAGE|SM_CLOCK|XID_ERRORS)|DCGM_FI_PROF_(GR_ENGINE|SM|PIPE_TENSOR)_ACTIVE|nembo_fleet_gpus|nembo_agent_heartbeat_delay_seconds_(sum|count))' > "$out/metrics-$1.txt"
  # GPM ratios (10 s means, Hopper+) beside DCGM's 1001/1002/1004, else nvidia-smi's GPM metrics 1/2/5 (percent), else plain sm%
  { command -v dcgmi >/dev/null && dcgmi dmon -e 1001,1002,1004 -c 3; } > "$out/prof-$1.txt" 2>&1 || nvidia-smi dmon --gpm-metrics 1,2,5 -c 3 > "$out/prof-$1.txt" 2>&1 || nvidia-smi dmon -s u -c 3 > "$out/prof-$1.txt"; cat "$out/prof-$1.txt"
  "$bin/nembo" gpus
  cat "$out/smi-$1.csv" "$out/metrics-$1.txt"
}
{
  nvidia-smi -L
  printf 'name: hold\nrun: sleep 240\n' > /tmp/hold.yaml
  "$bin/nembo" launch --detach /tmp/hold.yaml; echo "launch rc=$?"
  sleep 6
  echo "== idle"; snapshot idle
  echo "== under load"
  python3 - <<'PY' &
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn_like(a)
t = time.time()
while time.time() - t < 14:
    c = a @ b
torch.cuda.synchronize()
PY
  sleep 9; snapshot load; wait
  echo "== agent footprint, 60 s, real NVML at 1 Hz"
  pid=$(cat "$HOME/.nembo/coordinator/nodes/node-1/agent.pid")
  cpu() { awk '{print $14+$15}' "/proc/$pid/stat"; }
  c0=$(cpu); sleep 60; c1=$(cpu)
  grep -E 'VmRSS|VmHWM|Threads' "/proc/$pid/status"
  echo "agent CPU over 60 s: $(( c1 - c0 )) ticks of 1/100 s"
  "$bin/nembo" local down
} 2>&1 | tee "$out/log.txt"
