#!/usr/bin/env bash
# The whole GPU benchmark on a bare GPU machine with no network (see README "GPU results").
# The default model's GGUF (98 MB) travels in two halves (.gguf1/, .gguf2/, split -b 48M),
# the gguf wheel in .whl/. Usage, as two calls on one warm machine:
#   bash benchmarks/gpu.sh stage      # carry .gguf1: keeps the first half in /root/m (and .resume/, if carried)
#   bash benchmarks/gpu.sh run [WHAT] # carry .gguf2 .whl: joins the file, runs WHAT, writes JSON to $OUT
# WHAT: bench (default) | bench2 | sweep | batch | quant | prefix | all | distill | distill-more | distill-bench
#   distill: distil a 4-layer draft of the default model (greedy text for DISTILL_GEN_S=150 s with
#     compile=True, then DISTILL_TRAIN_S=330 s of training, the last quarter through the int4 rounding;
#     more `specdec distill` options in DISTILL_ARGS, later ones win); ~9.5 min. Acceptance is replayed
#     on 4+4 held-out prompts; measure the file on all of them with benchmarks/draft_acceptance.py (CPU).
#     $OUT gets distill-train.json, distill-acceptance.json, distill-log.txt, the shipped int4 weights
#     and the target's text (distill-generated.pt.xz, lzma-compressed so that it comes back). Bench it with `distill-bench` next, warm.
#   distill-resume: train on (DISTILL_TRAIN_S=420, no generation) from the float checkpoint and text of
#     `distill`, when called while the machine is still warm; else from .resume/*.safetensors (any
#     shipped file) on .resume/*.pt or *.pt.xz: `stage` carrying .gguf1, `stage` carrying .resume, `run
#     distill-resume` carrying .gguf2 .whl. $OUT gets the same files as distill.
#   distill-more: train the shipped file on (DISTILL_TRAIN_S=330) on NEW greedy text of the same prompts
#     (--gen-explore 4: sampled starts, --seed DISTILL_SEED=1; DISTILL_GEN_S=150), plus any earlier runs'
#     text staged from .resume/*.pt* (`stage` carrying .resume first: --add-generated); ~9.5 min, same files.
#     Called again while warm (another DISTILL_SEED), it trains on from the last run's float checkpoint
#     and adds that run's text (DISTILL_ADD_OLD=0: no earlier text, only this run's new text).
#     Long prompts whole: DISTILL_ARGS="--max-prompt-tokens 2048 --max-seq-len 2048"
#   Every distill run ends within DISTILL_DEADLINE=540 s of its start (`--deadline`: training gets what loading
#     and generation left), so a call's files come back even when generation and its setup run long (session 12:
#     240 s of text + 200 s of training ran past the 10-minute call; keep DISTILL_GEN_S + DISTILL_TRAIN_S <= ~400).
#   distill-bench: the bench part alone, on a warm machine after `distill` (reuses /root/distilled-ship; first
#     measures it and the committed file held out, float32, all 22 prompts: draft-acceptance-gpu-fp32.json)
#   distill-feature: train an EAGLE-style feature draft (one layer reading the target's features;
#     FEATURE_TRAIN_S of training, default 270), measure its acceptance vs self:4 and the shipped layered
#     draft; $OUT gets distill-feature-train.json, distill-feature-acceptance.json and the int8 file.
#     More `specdec distill` options in DISTILL_ARGS (the layered recipe's: "--gen-compile --gen-explore 4
#     --gen-prompts 14000 --max-prompt-tokens 2048 --max-seq-len 2048 --gen-batch-size 512
#     --gen-batch-tokens 131072 --top1-weight 1.0 --final-prompts 0": the final measurement of
#     four drafts made most of the ~220 s session 5's 536-s run spent outside generation and training;
#     measure the file on CPU instead); FEATURE_RESUME=1 trains the shipped file on. Called again while
#     warm, it trains on from the last run's float checkpoint (seed DISTILL_SEED=1) on new text plus that
#     run's (DISTILL_ADD_OLD=0: new text only).
#     FEATURE_BENCH=1 also benches code + chat with it (else run `distill-feature-bench` next, warm).
#   distill-feature-bench: bench code + chat with --draft distilled-feature (ours-draft rows; the layered
#     draft gets the ours-distilled and hf-assisted-distilled rows: HF cannot run a feature draft), on a
#     warm machine after `distill-feature` (reuses /root/feature-ship) or with the file in specdec/drafts
# These need no GGUF (random-weight models), so ONE call does them (carry .whl only):
#   fastpath:      8B-shaped roofline (HF eager, ours graphs, ours inductor + coordinate
#                  descent) and the GPU tests (pytest -m gpu); ~8 min
#   fastpath-profile: 8B roofline (HF eager, ours inductor + coordinate descent), the kernel
#                  profile of one compiled step (benchmarks/step_kernels.py, reusing the compile) and
#                  a repeat of the roofline in a new process (REPEAT=0 skips it); ~8 min
#   prefix-random: prefix cache TTFT hit/miss/overhead on 1B (eager and compile=True) and 8B shapes; ~5 min
set -euo pipefail
cd "$(dirname "$0")/.."
M=/root/m
GGUF=$M/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$M"
case "${1:-run}" in
stage)  # whatever of .gguf1/ (the GGUF's first half) and .resume/ (see distill-resume) was carried
    [ -d .gguf1 ] && cp .gguf1/* "$M/"
    [ -d .resume ] && mkdir -p /root/resume && cp .resume/* /root/resume/
    ls -la "$M" /root/resume 2>/dev/null || true
    exit 0 ;;
run) ;;
*) echo "usage: gpu.sh stage | run [bench|bench2|sweep|batch|quant|prefix|all|distill|distill-resume|distill-more|distill-bench|distill-feature|distill-feature-bench|fastpath|fastpath-profile|prefix-random]"; exit 2 ;;
esac
WHAT="${2:-bench}"
if [[ "$WHAT" != fastpath* && "$WHAT" != prefix-random && ! -s "$GGUF" ]]; then
    [ -d .gguf2 ] && cp .gguf2/* "$M/"
    cat "$M"/gguf.part.* > "$GGUF.tmp" && mv "$GGUF.tmp" "$GGUF"   # no empty file left behind on failure
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" SPECDEC_DEFAULT_GGUF="$GGUF" SPECDEC_CACHE=/root/cache
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
bench() { python3 -m specdec.cli bench --device cuda --out "$OUT" --quiet "$@" 2>&1 | grep -v "Loading weights" || true; }
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
    [ -f benchmarks/prefix_bench.py ] && python3 benchmarks/prefix_bench.py --device cuda --out "$OUT" 2>&1 | tail -30 || true
    # miss vs hit TTFT, eager and compile=True, the min_hit_tokens crossover and token identity, one JSON
    python3 -m benchmarks.prefix_ttft --device cuda --lengths 128,256,512,1024,2048,8192 --out "$OUT" 2>&1 \
        | grep -v "Loading weights" | tail -12 || true
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
    # GPU defaults measured in session 5 (greedy text, prompts cut to 640 tokens, 80% of rows the target's)
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
    # the text too, unless FEATURE_BENCH's three files would make $OUT more than the 8 files a call returns
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
    for w in code chat; do bench --dtype bfloat16 --workload $w --n-prompts 2 --draft distilled-feature; done 2>&1 \
        | tee "$OUT/bench-feature-log.txt"
fi
ls -la "$OUT"
