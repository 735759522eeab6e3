#!/usr/bin/env bash
# L40S smoke test: one command on a node with NVIDIA L40S GPUs and TensorRT-LLM installed.
#
#   ./scripts/l40s_smoke.sh [CONFIG] [ROWS]      (defaults: configs/l40s-llama-3.1-8b-fp8.yaml, 400)
#
# 1. checks the GPU, TensorRT-LLM and the config;
# 2. fetches the FP8 engine from engine.options.engine_cache, or builds and publishes it
#    (`batchinfer build-engine`);
# 3. runs ROWS prompts through `batchinfer run` on every GPU of this node (local Ray);
# 4. runs `trtllm-bench throughput` on the same engine with the same prompt and output
#    lengths, and prints tokens/s per GPU for both.
# Work files go to $WORK (default: a new folder under /tmp); nothing else is changed,
# except that a newly built engine is published to the config's engine cache.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/l40s-llama-3.1-8b-fp8.yaml}
ROWS=${2:-400}
PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d /tmp/l40s-smoke.XXXXXX)}
say() { printf '\n== %s\n' "$*"; }
die() { printf 'l40s_smoke: %s\n' "$*" >&2; exit 1; }

say "checks"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this needs a node with NVIDIA GPUs and drivers"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
GPUS=$(nvidia-smi -L | wc -l)
echo "GPUs: $GPUS x $GPU_NAME"
[[ "$GPU_NAME" == *L40S* ]] || echo "warning: this is not an L40S; the engine will be built for $GPU_NAME"
"$PY" -c "import tensorrt_llm" >/dev/null 2>&1 || die "tensorrt_llm does not import: install it as in README 'Running on L40S'"
command -v trtllm-bench >/dev/null || die "trtllm-bench not found (it comes with the tensorrt-llm wheel)"
"$PY" -m batchinfer.cli validate "$CONFIG" >/dev/null || die "$CONFIG does not validate (run: batchinfer validate $CONFIG)"
MODEL=$("$PY" -c "from batchinfer.config_loader import load_config; print(load_config('$CONFIG').engine.model)")
echo "model: $MODEL; work folder: $WORK"

"$PY" scripts/sample_prompts.py "$WORK/prompts" --files 1 --rows-per-file "$ROWS" --row-group-size 50
SETS=(--set "input.path=$WORK/prompts/" --set "input.id_column=id" --set "input.passthrough_columns=[]"
      --set "output.path=$WORK/out/" --set "run.num_workers=$GPUS" --set "run.rows_per_shard=50"
      --set "sampling.max_tokens=128" --set "run.ray_address=null")
unset RAY_ADDRESS

say "engine (fetch from the cache, or build and publish)"
"$PY" -m batchinfer.cli build-engine "$CONFIG" "${SETS[@]}" | tee "$WORK/build.txt"
ENGINE_DIR=$(awk '$1 == "local" {print $2}' "$WORK/build.txt")
[[ -f "$ENGINE_DIR/rank0.engine" ]] || die "no engine folder reported by build-engine"

say "batchinfer run: $ROWS prompts on $GPUS GPU(s)"
"$PY" -m batchinfer.cli run "$CONFIG" "${SETS[@]}" --new-run --no-progress | tee "$WORK/run.txt"
read -r ISL OSL OURS < <("$PY" - "$WORK/out/_batchinfer/manifest.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
rows, run = m["rows"]["ok"], m["this_run"]
print(round(m["tokens"]["prompt"] / rows), max(1, round(m["tokens"]["completion"] / rows)),
      round(run["tokens_per_s"] / max(run["workers"], 1), 1))
PY
)

say "trtllm-bench on the same engine (one GPU), input $ISL / output $OSL tokens per request"
trtllm-bench --model "$MODEL" --model_path "$MODEL" prepare-dataset --output "$WORK/dataset.jsonl" \
    token-norm-dist --num-requests "$ROWS" --input-mean "$ISL" --input-stdev 0 \
    --output-mean "$OSL" --output-stdev 0 >/dev/null
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} trtllm-bench --model "$MODEL" --model_path "$MODEL" \
    throughput --backend tensorrt --engine_dir "$ENGINE_DIR" --dataset "$WORK/dataset.jsonl" \
    --report_json "$WORK/bench.json" > "$WORK/bench.txt" 2>&1 || { tail -20 "$WORK/bench.txt"; die "trtllm-bench failed"; }
BENCH=$("$PY" -c "import json; print(round(json.load(open('$WORK/bench.json'))['performance']['system_output_throughput_tok_s'], 1))")

say "result"
printf '%-44s %12s\n' "output tokens/s per GPU" ""
printf '%-44s %12s\n' "batchinfer run (real prompts, stops at EOS)" "$OURS"
printf '%-44s %12s\n' "trtllm-bench (same lengths, fixed output)" "$BENCH"
"$PY" -c "print(f'ratio batchinfer / trtllm-bench: {float($OURS) / float($BENCH):.2f}')"
echo "details: $WORK (run.txt, bench.txt, out/_batchinfer/manifest.json)"
