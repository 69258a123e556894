#!/usr/bin/env bash
# lm-evaluation-harness against raytp, as a user runs it: its `local-completions` backend over HTTP on a raytp
# server of the `tiny` model (TP=2, CPU), beside its `hf` backend (transformers, in-process) on the same
# checkpoint, on a task read from a local file (benchmarks/lm_eval/). Prints both results and the largest
# difference between the two backends' loglikelihoods.
#
#   bash benchmarks/lm_eval_compare.sh [--venv DIR] [--out DIR]
#
# lm-eval goes into its own venv (with this Python's packages visible, so it reuses torch and transformers).
# local-completions needs add_bos_token=True to score the same tokens as the hf backend, which prepends the
# Llama tokenizer's BOS.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$HOME/.cache/raytp/lmeval-venv"
out=benchmarks/results/lm_eval
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if ! "$venv/bin/lm_eval" --help >/dev/null 2>&1; then
  python -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q "lm-eval[api]==0.4.13" accelerate
fi
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
model=$(python -c "from raytp.tiny import ensure_tiny_checkpoint; print(ensure_tiny_checkpoint())")
tasks=$(mktemp -d)
cp benchmarks/lm_eval/sentences.jsonl "$tasks/"
sed "s|test: sentences.jsonl.*|test: $tasks/sentences.jsonl|" benchmarks/lm_eval/sentences.yaml >"$tasks/sentences.yaml"
rm -rf "$out" && mkdir -p "$out"
port=8393

setsid raytp serve --model tiny --tensor-parallel-size 2 --device cpu --port "$port" --metrics-export-port 8394 \
  >"$out/raytp-server.log" 2>&1 &
server=$!
trap 'kill -INT -- "-$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && break; sleep 1; done

common=(--tasks raytp_sentences --include_path "$tasks" --log_samples)
"$venv/bin/lm_eval" run --model hf --model_args "pretrained=$model,dtype=float32" --device cpu --batch_size 1 \
  --output_path "$out/hf" "${common[@]}" 2>&1 | grep -E "^\|"
"$venv/bin/lm_eval" run --model local-completions \
  --model_args "model=tiny,base_url=http://127.0.0.1:$port/v1/completions,tokenizer_backend=huggingface,tokenizer=$model,num_concurrent=4,max_retries=1,add_bos_token=True" \
  --output_path "$out/raytp" "${common[@]}" 2>&1 | grep -E "^\|"
python - "$out" <<'PY'
import glob, json, sys
def samples(d):
    path = glob.glob(f"{sys.argv[1]}/{d}/**/*.jsonl", recursive=True)[0]
    return {r["doc_id"]: r for r in map(json.loads, open(path))}
hf, rt = samples("hf"), samples("raytp")
diff = max(abs(float(a[0][0]) - float(b[0][0])) for k in hf for a, b in zip(hf[k]["resps"], rt[k]["resps"]))
same = sum(hf[k]["acc"] == rt[k]["acc"] for k in hf)
print(f"loglikelihoods: max |hf - raytp| = {diff:.2e} over {sum(len(r['resps']) for r in hf.values())} choices; "
      f"same answer on {same}/{len(hf)} questions")
PY
