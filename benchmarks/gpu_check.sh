#!/usr/bin/env bash
# The GPU check, ready to run on an H100/H200 in under 8 minutes (from the repository root, after
# the README's install): the CUDA-tensor tests of the triton and cuda backends, then the token-stats
# and loss benchmarks at N = 8192, V = 151 936 bf16 with a device-to-device copy measured in the
# same run, and the measured times set beside the static SASS report's predictions.
#
#   bash benchmarks/gpu_check.sh            # writes benchmarks/results/<gpu>-*.json
#
# Each step has its own time limit so one slow step cannot eat the others' budget; the script
# goes on after a failed step and exits non-zero at the end if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

out=benchmarks/results
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))") || {
  echo "no CUDA device" >&2
  exit 2
}
mkdir -p "$out"
status=0
step() {  # step <seconds> <name> <command...>
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || status=1
}

# 1. the CUDA-tensor tests of the triton and cuda backends (the CPU cases run in CI already)
step 240 tests python -m pytest -q -x -p no:cacheprovider -k "triton or cuda or gpu" \
  tests/test_token_stats.py tests/test_token_stats_extra.py tests/test_batch_invariance.py \
  tests/test_hardening_large_logits.py tests/test_policy_loss.py tests/test_advantages.py \
  tests/test_phase_stats.py tests/test_linear_stats.py tests/test_rollout_correction.py \
  tests/test_cuda_ops.py tests/test_cuda_backend.py tests/test_determinism.py \
  tests/test_linear_token_stats.py tests/test_token_stats_sparse.py tests/test_policy_loss_dppo.py \
  tests/test_integration_trl_vllm_correction.py \
  --junitxml="$out/$gpu-tests.xml"

# 2. benchmarks: token statistics and the loss paths, with the device copy in the same run
step 150 bench python -m lenkernels.bench --device cuda --suite token_stats --suite loss_from_logits \
  --suite policy_loss --no-progress --json "$out/$gpu-bench.json"

# 3. predicted (static SASS report, no GPU) vs measured
step 30 compare python - "$out/sass-sm90.json" "$out/$gpu-bench.json" "$out/$gpu-predicted-vs-measured.json" "$gpu" <<'PY'
import json
import sys

sass_path, bench_path, out_path, gpu = sys.argv[1:]
sass, bench = json.load(open(sass_path)), json.load(open(bench_path))
card = "H200" if "H200" in gpu else "H100"
fwd_ms = {k["source"]: k["model"][card]["predicted_ms"] for k in sass["kernels"]
          if k["arch"] == 90 and k["kernel"].endswith("token_stats_fwd")}
rows = []
for k in sass["kernels"]:
    if k["arch"] != 90 or not k["kernel"].endswith(("token_stats_fwd", "token_stats_bwd")):
        continue
    backend = k["source"]  # triton | cuda
    mode = "fwd" if k["role"] == "fwd" else "fwd+bwd"
    measured = [r for r in bench["results"] if r["suite"] == "token_stats" and r["status"] == "ok"
                and r["provider"] == f"lenkernels-{backend}" and r["mode"] == mode
                and r["case"].get("tokens") == sass["model"]["N"]]
    rows.append({
        "kernel": k["kernel"], "mode": mode, "instructions_per_logit": k["instructions_per_logit"],
        "predicted_ms": k["model"][card]["predicted_ms"], "floor_ms": k["model"][card]["floor_ms"],
        # fwd+bwd is measured as one step: its prediction is the forward's plus the backward's
        "predicted_step_ms": k["model"][card]["predicted_ms"] + (fwd_ms.get(backend, 0.0) if mode == "fwd+bwd" else 0.0),
        "measured_ms": measured[0]["median_ms"] if measured else None,
        "copy_share": measured[0]["copy_share"] if measured else None,
    })
json.dump({"gpu": gpu, "model_card": card, "rows": rows}, open(out_path, "w"), indent=1)
for r in rows:
    print(r)
PY

echo "results in $out/$gpu-*.json (commit them)"
exit $status
