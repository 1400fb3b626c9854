"""``specdec distill``: make a small, fast draft for any target, on its own text."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("specdec.distill")

DESCRIPTION = """\
Make a draft model for speculative decoding from a target model, with no data set and
no network. Two kinds (--kind):

  feature  EAGLE-style (Li et al. 2024): ONE decoder layer that reads the target's own
           last-layer features (+ the next token) and predicts the next feature; the target's
           final norm and head turn it into logits. Much higher acceptance per draft FLOP.
  layers   the target's architecture with N decoder layers (copied from the target's layers,
           see --init), sharing the target's tokenizer, embeddings and head (the default).

Steps:
  1. build the draft (its own weights only: the target's embeddings and head are shared);
  2. let the target write training text: it continues real prompts that ship with Python
     (stdlib function stubs, questions about the Python reference; the `code` and `chat`
     benchmark prompts are held out), plus stdlib source and any --text files;
  3. train it on the target's outputs (layers: KL to the next-token distributions; feature:
     SmoothL1 to the next feature + KL, over --depths drafting steps at once), AdamW, cosine
     LR, replaying its greedy acceptance (k=4) on held-out prompts every --eval-every steps;
     the prompts of the target's text weigh --prompt-weight (decoding never drafts a prompt);
     with --ship, the last --qat fraction of the steps (0.25) trains through the file's own
     rounding, so the file holds what was trained;
  4. save it to --out (layers: an HF model directory that AutoModelForCausalLM loads; feature:
     feature-draft.safetensors, for specdec.distill.load_feature_draft) + distill.json (the
     training log), and measure acceptance with specdec.generate against the untrained
     self-draft self:4 (and, for feature, the shipped layered draft).

A GPU makes this minutes; a CPU run is for small models or smoke tests."""

EPILOG = """\
examples:
  specdec distill --kind feature --time-budget 270 --out drafts/smol-feature   # bundled SmolLM2-135M, GPU
  specdec distill --layers 4 --steps 2000 --out drafts/smol-L4          # bundled SmolLM2-135M, GPU
  specdec distill --target ./my-model --layers 2 --time-budget 600 --text notes.md --out ./my-draft
  specdec distill --layers 4 --steps 2000 --out d --ship d/smol-L4.safetensors   # + int4 file to ship
  specdec distill --time-budget 300 --out d --ship d/L4.safetensors --save-generated d/text.pt
  specdec distill --resume d/L4.safetensors --generated d/text.pt --time-budget 400 --out d2   # train on, no generation
  specdec distill --resume d/L4.safetensors --gen-explore 4 --seed 1 --gen-compile --time-budget 330 --out d3
                                                        # train on, on new greedy text of the same prompts
  specdec distill --resume d3/layers-draft.safetensors --max-prompt-tokens 2048 --max-seq-len 2048 \\
      --add-generated d/text.pt --gen-compile --time-budget 330 --out d4
                                                        # long prompts (a long system prompt) kept whole
  specdec distill --resume d4/layers-draft.safetensors --layers 6 --generated d/text.pt --out d5   # grow to 6
  specdec distill --gen-compile --gen-time 240 --time-budget 300 --deadline 540 --out d6
                                                        # a 10-minute job: training shrinks to fit
then:
  specdec generate "def fib(n):" --draft d          # a layers directory or a feature-draft file/directory
  specdec bench --workload code --draft d

acceptance = drafted tokens the target kept / drafted tokens; a draft pays off when it is
high and the draft is cheap: --layers trades one for the other (4-6 for a 30-layer target; more
layers accept more and cost more per drafted token). A feature draft costs one layer but needs
more training to accept as much; it runs with compile=True but not compile="inductor".
Measured acceptance and speed of the shipped drafts: docs/distill.md."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specdec distill", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=None,
                   help="HF model dir, .gguf file or hub name (default: bundled SmolLM2-135M)")
    p.add_argument("--out", required=True, help="directory to write the draft to (HF format or "
                   "feature-draft.safetensors, + distill.json)")
    p.add_argument("--kind", default="layers", choices=("layers", "feature"),
                   help="layers: a shallow copy of the target (default); feature: an EAGLE-style one-layer "
                        "draft reading the target's features")
    p.add_argument("--layers", type=int, default=None,
                   help="layers kind: decoder layers of the draft (default 4); with --resume, more layers than "
                        "the file's grow it: new layers (target copies) go between the trained ones, their "
                        "output projections zeroed, so the deeper draft starts where the file was")
    p.add_argument("--init", default="spread", choices=("spread", "first"),
                   help="which target layers the draft starts from: evenly spaced first..last (default) or the first N")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default 1000; with --time-budget, the most, default no limit)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="fit the step count to this much training time (measured on the first steps)")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="end the whole run within SECONDS of its start (a job's time limit): training gets what "
                        "loading and generation left, less --deadline-reserve, if that is below --time-budget")
    p.add_argument("--deadline-reserve", type=_non_negative, default=30.0, metavar="SECONDS",
                   help="time --deadline keeps for what follows training: writing and replaying the files "
                        "(default 30; add the final measurement's time unless --final-prompts 0)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: 32 on GPU, 4 on CPU)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 512 on GPU, 128 on CPU)")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="keep the target's texts up to N tokens whole (default: --seq-len; longer ones keep their "
                        "start and end): long prompts, e.g. a system prompt the target quotes from far back. "
                        "Steps of long rows hold fewer of them (batch-size x seq-len slots a step)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    for flag, kind, default, text in _FEATURE_OPTIONS:
        p.add_argument(flag, type=kind, default=default, help=f"feature kind: {text}")
    p.add_argument("--feature-init", default="last-layer", choices=("last-layer", "random"),
                   help="feature kind: start the draft layer as a copy of the target's last decoder layer, fed "
                        "the features at the residual stream's scale (default), or from random weights")
    p.add_argument("--eval-every", type=int, default=100, help="steps between acceptance replays (0: start and end)")
    p.add_argument("--text", nargs="*", default=[], metavar="FILE", help="extra plain-text files to train on")
    p.add_argument("--text-chars", type=int, default=None,
                   help="characters of stdlib source and reference text (default: 6M on GPU, 300k on CPU)")
    p.add_argument("--gen-prompts", type=int, default=None,
                   help="prompts the target continues (default: 2000 on GPU, 16 on CPU); see --gen-time")
    p.add_argument("--gen-time", type=float, default=None, metavar="SECONDS",
                   help="stop starting new generation batches after this long (default: 60 on GPU, none on CPU)")
    p.add_argument("--gen-tokens", type=int, default=160, help="tokens the target writes per prompt (default 160)")
    p.add_argument("--gen-batch-tokens", type=int, default=None, metavar="N",
                   help="at most N prompt tokens per generation batch (rows x longest prompt; default: 262144 "
                        "on GPU, none on CPU): long prompts go in smaller batches, whose prefill fits in memory")
    p.add_argument("--gen-batch-size", type=int, default=None,
                   help="prompts per generation batch (default: 256 on GPU, 8 on CPU)")
    p.add_argument("--gen-explore", type=int, default=0, metavar="N",
                   help="sample the first N new tokens of each continuation (temperature 1), then greedy: new "
                        "greedy text from the same prompts (with another --seed than an earlier run's text); "
                        "default 0")
    p.add_argument("--gen-compile", action="store_true",
                   help="let the target write with compile=True (static cache + CUDA graphs, the same tokens): "
                        "several times faster than eager batched decoding on a GPU, where a small target is "
                        "host-bound")
    p.add_argument("--temperature", type=_non_negative, default=0.0,
                   help="sampling temperature of the target's text; 0 = greedy (default), what greedy decoding "
                        "and the acceptance replay see")
    p.add_argument("--top1-weight", type=_non_negative, default=0.0,
                   help="add this x cross-entropy on the target's top-1 token to the KL loss (feature kind: "
                        "per depth, scaled by --kl-weight too); greedy acceptance asks only for the top-1 "
                        "(default 0: KL alone)")
    p.add_argument("--prompt-weight", type=_non_negative, default=0.1,
                   help="loss weight of the prompt tokens of the target's text (default 0.1): decoding only "
                        "drafts what the target writes, and templated, repeated prompts are easy to fit; "
                        "the target's tokens and plain text weigh 1")
    p.add_argument("--generated-fraction", type=float, default=0.8,
                   help="share of training rows taken from the target's own text (rest: plain text; default 0.8)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="cut longer prompts in the middle (default: 640 on GPU, 512 on CPU)")
    p.add_argument("--eval-prompts", type=int, default=None,
                   help="held-out code and chat prompts replayed during training (default: 4 each)")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="greedy tokens per held-out prompt (default: 128 on GPU, 48 on CPU)")
    p.add_argument("--final-prompts", type=int, default=None,
                   help="held-out prompts per workload for the final specdec.generate measurement "
                        "(default: all on GPU, 2 on CPU; 0 skips it)")
    p.add_argument("--resume", default=None, metavar="FILE",
                   help="start from this draft file (a --ship file of an earlier run, any bits) instead of the "
                        "target's layers; its kind and layers override --kind and --init (--layers can grow it)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--save-generated", default=None, metavar="FILE",
                      help="also write the target's continuations here, for --generated in a later run "
                           "(a name ending in .xz: lzma-compressed, for shipping it off a remote machine)")
    text.add_argument("--generated", nargs="+", default=None, metavar="FILE",
                      help="train on continuations an earlier run saved (--save-generated) instead of "
                           "generating (the files must come from this target)")
    p.add_argument("--add-generated", nargs="+", default=None, metavar="FILE",
                   help="also train on continuations earlier runs saved, next to the text this run writes "
                        "(more text: e.g. an earlier --gen-explore run's with another --seed)")
    p.add_argument("--ship", default=None, metavar="FILE",
                   help="also write the draft's own weights to this .safetensors file "
                        "(what specdec/drafts/ holds), quantized to --ship-bits")
    p.add_argument("--ship-bits", type=int, default=None, choices=(4, 8),
                   help="int4 (group 32, about half the bytes) or int8 (per channel) for --ship "
                        "(default: int4 for layers, int8 for feature)")
    p.add_argument("--qat", type=_fraction, default=None, metavar="FRACTION",
                   help="train the last FRACTION of the steps through --ship's rounding (quantization-aware: "
                        "the file then holds what was trained; default 0.25 with --ship, else 0; 1 = all steps)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="target dtype (the draft trains in float32 under autocast); "
                        "default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


# feature-kind numeric options: flag, type, default, help
_FEATURE_OPTIONS = (
    ("--depths", int, 3, "drafting steps trained at once, each on the previous one's predicted features "
                         "(default 3; 1 = EAGLE-1's training)"),
    ("--kl-weight", float, 1.0, "weight of KL(target || draft) against SmoothL1 on features (default 1)"),
    ("--noise", float, 0.1, "uniform noise U(-x, x) on the true input features (default 0.1)"),
    ("--intermediate-size", int, None, "MLP width of the draft layer (default: the target's)"),
)


def _defaults(args) -> None:
    import torch

    gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    args.device = args.device or ("cuda" if gpu else "cpu")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.steps is None:
        args.steps = 1000 if args.time_budget is None else 10**9
    for path in [args.resume] + (args.generated or []) + (args.add_generated or []):
        if path and not Path(path).is_file():
            raise ValueError(f"{path}: no such file (--resume takes a --ship file, --generated and --add-generated "
                             "--save-generated ones)")
    if args.generated and args.add_generated:
        raise ValueError("--add-generated adds saved text to the text this run writes; with --generated it writes "
                         "none: give all the files to --generated")
    if args.resume:  # the file decides the kind
        from specdec.distill.shipped import read_metadata

        args.kind = read_metadata(args.resume)["kind"]
    args.ship_bits = args.ship_bits or (8 if args.kind == "feature" else 4)
    if args.qat is None:
        args.qat = 0.25 if args.ship else 0.0
    elif args.qat and not args.ship:
        raise ValueError("--qat trains through the rounding of the --ship file: give --ship FILE too")
    pick = {"batch_size": (16 if args.kind == "feature" else 32, 4), "seq_len": (512, 128),
            "text_chars": (6_000_000, 300_000),
            "gen_prompts": (2000, 16), "gen_time": (60.0, None), "gen_batch_size": (256, 8),
            "gen_batch_tokens": (256 * 1024, None),
            "max_prompt_tokens": (640, 512), "eval_prompts": (4, 4), "eval_tokens": (128, 48),
            "final_prompts": (None, 2)}
    for name, (on_gpu, on_cpu) in pick.items():
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    if args.gen_batch_tokens is not None and args.gen_batch_tokens < 1:
        raise ValueError(f"--gen-batch-tokens must be >= 1 (prompt tokens per generation batch), got "
                         f"{args.gen_batch_tokens}")
    if args.deadline is not None and args.deadline <= args.deadline_reserve:
        raise ValueError(f"--deadline {args.deadline:g} s is not after --deadline-reserve {args.deadline_reserve:g} s "
                         "(the time kept for writing the files): give the job's whole time limit in seconds")
    if args.max_seq_len is not None and args.max_seq_len < args.seq_len:
        raise ValueError(f"--max-seq-len {args.max_seq_len} is below --seq-len {args.seq_len}: it is the longest "
                         "row kept whole; give at least --seq-len (or leave it out)")


def main(argv: list[str] | None = None) -> dict:
    import torch

    from specdec.distill import data, evaluate, save, train

    args = build_parser().parse_args(argv)
    _defaults(args)
    _log_to_stderr()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    target, tok = _load_target(args)
    draft, task, layers = _build(target, args)
    held = {name: data.encode_prompts(prompts, tok, args.max_prompt_tokens)
            for name, prompts in data.held_out_prompts().items()}
    eval_sets = [evaluate.greedy_eval_set(target, name, ids[:args.eval_prompts], args.eval_tokens)
                 for name, ids in held.items()]
    generated, gen_s = _generated(target, tok, args)
    texts = data.tokenize_texts(data.plain_texts(args.text_chars, args.text, args.seed), tok)
    log.info("training text: %d target continuations (%d new tokens, %.0f s), %d plain-text pieces (%d tokens)",
             len(generated), sum(len(s.ids) - s.prompt_len for s in generated), gen_s, len(texts),
             sum(len(s.ids) for s in texts))
    sampler = data.WindowSampler(generated, texts, args.seq_len, args.generated_fraction,
                                 pad_id=tok.pad_token_id or 0, seed=args.seed, prompt_weight=args.prompt_weight,
                                 max_len=args.max_seq_len)
    if args.kind == "feature" and args.feature_init == "last-layer" and not args.resume:
        _init_feature(target, draft, sampler, args)
    if args.deadline is not None:
        _fit_deadline(task.config, args, time.perf_counter() - started)
    trained = train.train(target, draft, sampler, task.config, eval_sets, progress=not args.quiet, task=task)
    log.info("trained %d steps in %.0f s: loss %.3f, replayed acceptance %s", trained.steps, trained.seconds,
             trained.loss[-1][1] if trained.loss else float("nan"),
             trained.acceptance[-1][1] if trained.acceptance else "-")
    record = _record(args, target, layers, generated, gen_s, texts, trained)
    if args.kind == "feature":
        record["draft"] = dict(kind="feature", config=draft.config.as_dict(), init=args.feature_init,
                               feature_scale=getattr(args, "feature_scale", None),
                               parameters=sum(p.numel() for p in draft.parameters()))
    if args.ship:  # from the float weights it trained (and, with --qat, rounded) as
        record["shipped"] = _ship(draft, target, layers, trained, args, eval_sets)
    _save(draft, target, tok, args, layers)
    _cast_own(draft, task.parameters(), target)
    if args.final_prompts != 0:
        record["final"] = _final_acceptance(target, draft, layers, held, args)
    record["total_s"] = time.perf_counter() - started
    save.write_json(record, Path(args.out) / save.RECORD_NAME)
    log.info("wrote %s (%.0f s in all)", args.out, record["total_s"])
    return record


def _fit_deadline(config, args, elapsed: float) -> None:
    """Shrink training's time budget to what ``--deadline`` leaves after ``elapsed`` seconds."""
    left = args.deadline - elapsed - args.deadline_reserve
    if left < 1:
        raise ValueError(f"--deadline {args.deadline:g} s leaves no time to train: loading and generation took "
                         f"{elapsed:.0f} s and --deadline-reserve keeps {args.deadline_reserve:g} s; give a later "
                         "deadline or a shorter --gen-time")
    if config.time_budget_s is None or left < config.time_budget_s:
        log.info("--deadline %g s: %.0f s of training left (%.0f s gone, %g s kept for the files)",
                 args.deadline, left, elapsed, args.deadline_reserve)
        config.time_budget_s = left  # a cap: --steps still ends training first if it comes first


def _log_to_stderr() -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[distill] %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def _load_target(args):
    from specdec.integrations.models import load_model

    target, tok = load_model(args.target, dtype=args.dtype, device=args.device)
    for p in target.parameters():  # the teacher is read, never trained
        p.requires_grad_(False)
    return target, tok


def _generated(target, tok, args):
    """The target's continuations: loaded (--generated) or written now (and saved: --save-generated)."""
    from specdec.distill import data

    if args.generated:
        start = time.perf_counter()
        loaded = [data.load_generated(path, target) for path in args.generated]
        generated = [s for seqs, _ in loaded for s in seqs]
        temperatures = {info.get("temperature") for _, info in loaded}
        args.temperature = temperatures.pop() if len(temperatures) == 1 else sorted(temperatures, key=str)
        log.info("loaded %d target continuations from %s", len(generated), ", ".join(args.generated))
        return generated, time.perf_counter() - start
    generated, seconds = _generate(target, tok, args)
    if args.save_generated:
        data.save_generated(generated, args.save_generated, target,
                            info=dict(temperature=args.temperature, gen_tokens=args.gen_tokens, seed=args.seed,
                                      explore_tokens=args.gen_explore))
        log.info("wrote the target's continuations to %s", args.save_generated)
    for path in args.add_generated or []:
        added, _ = data.load_generated(path, target)
        generated += added
        log.info("added %d target continuations from %s", len(added), path)
    return generated, seconds


def _generate(target, tok, args):
    from specdec.distill import data

    prompts = data.training_prompts(args.gen_prompts, args.seed)
    ids = data.encode_prompts(prompts, tok, args.max_prompt_tokens)
    start = time.perf_counter()
    generated = data.continue_prompts(target, ids, max_new_tokens=args.gen_tokens, temperature=args.temperature,
                                      batch_size=args.gen_batch_size, time_budget_s=args.gen_time, seed=args.seed,
                                      sources=[p.name.split("/")[1] for p in prompts], progress=not args.quiet,
                                      compile=args.gen_compile, explore_tokens=args.gen_explore,
                                      batch_tokens=args.gen_batch_tokens)
    return generated, time.perf_counter() - start


def _build(target, args):
    """(draft, training task, target layers it copies or None) for ``args.kind``."""
    import torch

    from specdec.distill import model, train

    common = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
                  time_budget_s=args.time_budget, quant_bits=args.ship_bits if args.ship else None,
                  quant_fraction=args.qat)
    if args.resume:
        return _resumed(target, args, common)
    if args.kind == "feature":
        from specdec.distill import feature_train
        from specdec.feature_draft import FeatureDraft, FeatureDraftConfig

        draft = FeatureDraft(FeatureDraftConfig.from_target(target, args.intermediate_size), target).float()
        config = feature_train.FeatureTrainConfig(**common, depths=args.depths, kl_weight=args.kl_weight,
                                                  noise=args.noise, top1_weight=args.top1_weight)
        log.info("feature draft: %s (%.1fM parameters)", draft.config, sum(p.numel() for p in draft.parameters()) / 1e6)
        return draft, feature_train.FeatureTask(target, draft, config), None
    n_target = target.config.get_text_config().num_hidden_layers
    layers = model.pick_layers(n_target, 4 if args.layers is None else args.layers, args.init)
    log.info("target: %d layers; draft: %d layers initialised from target layers %s", n_target, len(layers), layers)
    draft = model.build_draft(target, layers, dtype=torch.float32)
    task = train.LayeredTask(target, draft, args.top1_weight)
    task.config = train.TrainConfig(**common, top1_weight=args.top1_weight)
    return draft, task, layers


def _resumed(target, args, common):
    """(draft, task, layers) for a draft file to train on (--resume); its kind wins over --kind."""
    from specdec.distill import shipped, train

    draft, layers = shipped.resume_draft(target, args.resume)
    log.info("resuming the %s draft %s%s", args.kind, args.resume, f" (target layers {layers})" if layers else "")
    if layers is not None and args.layers is not None and args.layers != len(layers):
        from specdec.distill import model

        if args.layers < len(layers):
            raise ValueError(f"--layers {args.layers} is fewer than the {len(layers)} layers of {args.resume}: a "
                             "resumed draft can only grow (leave --layers out to keep its depth)")
        draft, layers = model.grow(draft, target, layers, args.layers)
        log.info("grew the draft to %d layers (target layers %s; new ones add nothing until trained)",
                 len(layers), layers)
    if layers is not None:
        task = train.LayeredTask(target, draft, args.top1_weight)
        task.config = train.TrainConfig(**common, top1_weight=args.top1_weight)
        return draft, task, layers
    from specdec.distill import feature_train

    config = feature_train.FeatureTrainConfig(**common, depths=args.depths, kl_weight=args.kl_weight, noise=args.noise,
                                              top1_weight=args.top1_weight)
    return draft, feature_train.FeatureTask(target, draft, config), None


def _init_feature(target, draft, sampler, args) -> None:
    from specdec.distill import feature_train
    from specdec.feature_draft import init_from_last_layer

    ids, mask = (t.to(args.device) for t in sampler.sample(min(args.batch_size, 8)))
    args.feature_scale = feature_train.residual_scale(target, draft, ids, mask)
    copied = init_from_last_layer(draft, args.feature_scale)
    log.info("feature draft starts from the target's last layer (%s), features scaled by %.1f",
             ", ".join(copied), args.feature_scale)


def _ship(draft, target, layers, trained, args, eval_sets) -> dict:
    from specdec.distill import shipped

    info = dict(steps=trained.steps, acceptance=trained.acceptance[-1][1] if trained.acceptance else None)
    name = Path(args.ship).stem
    if args.kind == "feature":
        path = shipped.export_feature(draft, target, args.ship, name=name, info=info, bits=args.ship_bits)
    else:
        path = shipped.export_shipped(draft, target, args.ship, layers, name=name, info=info, bits=args.ship_bits)
    log.info("wrote %s (%.1f MiB)", path, path.stat().st_size / 2**20)
    out = dict(path=str(path), bytes=path.stat().st_size, bits=args.ship_bits, qat_fraction=args.qat)
    if eval_sets:  # what the rounding costs (see --qat): the file replayed on the training run's held-out prompts
        rates = {e.name: _replay_file(target, path, e, args) for e in eval_sets}
        out["replayed_acceptance"] = dict(rates, mean=sum(rates.values()) / len(rates))
        log.info("shipped file replayed: %s", "  ".join(f"{k} {v:.3f}" for k, v in out["replayed_acceptance"].items()))
    return out


def _replay_file(target, path, eval_set, args) -> float:
    from specdec.distill import evaluate, shipped
    from specdec.distill.train import autocast_dtype

    amp = autocast_dtype(target)
    if args.kind == "feature":
        from specdec.distill.feature_train import replay_feature_acceptance

        return replay_feature_acceptance(target, shipped.load_file(target, path), eval_set, autocast_dtype=amp)
    return evaluate.replay_acceptance(shipped.load_file(target, path), eval_set, autocast_dtype=amp)


def _save(draft, target, tok, args, layers) -> None:
    import torch

    from specdec.distill import save, shipped

    if args.kind == "feature":
        shipped.export_feature(draft, target, Path(args.out) / shipped.FEATURE_FILE, name="feature", bits=None)
    else:
        save.save_draft(draft, args.out, tok, dtype=getattr(torch, args.dtype))
        # float32 own weights: what --resume trains on from without a rounding in between
        shipped.export_shipped(draft, target, Path(args.out) / shipped.LAYERS_FILE, layers, bits=None)


def _cast_own(draft, params, target) -> None:
    """The draft's own tensors to the target's dtype (they trained in float32)."""
    dtype = target.get_input_embeddings().weight.dtype
    for p in params:
        p.data = p.data.to(dtype)
        p.requires_grad_(False)


def _final_acceptance(target, draft, layers, held, args) -> dict:
    """specdec.generate (greedy, k=4) on held-out prompts: the new draft vs its shipped (quantized) file
    vs the untrained self:4 (and, for a feature draft, the shipped layered draft)."""
    import specdec
    from specdec.distill import evaluate, shipped

    name, n_self = ("feature", 4) if args.kind == "feature" else ("distilled", len(layers))
    drafts = {name: draft, f"self:{n_self}": specdec.early_exit_model(target, n_self)}
    if args.ship:
        drafts[f"{name}-int{args.ship_bits}"] = shipped.load_file(target, args.ship)
    if args.kind == "feature" and shipped.find_shipped(target, "layers") is not None:
        drafts["distilled-layers (shipped)"] = shipped.load_shipped_draft(target)
    n = args.final_prompts
    prompts = {w: ids if n is None else ids[:n] for w, ids in held.items()}
    out = {}
    for name, d in drafts.items():
        out[name] = evaluate.acceptance_by_workload(target, d, prompts, k=4, max_new_tokens=args.eval_tokens)
        log.info("acceptance (greedy, k=4) %-16s %s", name,
                 "  ".join(f"{w} {r['acceptance_rate']:.3f}" for w, r in out[name].items() if w != "mean"))
    return dict(k=4, max_new_tokens=args.eval_tokens, prompts={w: len(ids if n is None else ids[:n])
                                                               for w, ids in held.items()}, drafts=out)


def _record(args, target, layers, generated, gen_s, texts, trained) -> dict:
    from specdec.environment import environment

    by_source = {}
    for s in generated:
        by_source[s.source] = by_source.get(s.source, 0) + 1
    return dict(command="specdec distill " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["distill"] else sys.argv[1:]),
                environment=environment(), target=str(args.target or "SmolLM2-135M-Instruct (bundled)"),
                target_layers=target.config.get_text_config().num_hidden_layers, draft_layers=layers,
                init=f"resumed from {args.resume}" if args.resume else args.init, dtype=args.dtype,
                seq_len=args.seq_len, max_seq_len=args.max_seq_len or args.seq_len, seed=args.seed,
                data=dict(generated=len(generated), generated_by_kind=by_source,
                          generated_tokens=sum(len(s.ids) - s.prompt_len for s in generated), generation_s=gen_s,
                          loaded_from=args.generated or args.add_generated, temperature=args.temperature, explore_tokens=args.gen_explore,
                          prompt_weight=args.prompt_weight, text_pieces=len(texts),
                          text_tokens=sum(len(s.ids) for s in texts), generated_fraction=args.generated_fraction,
                          held_out="specdec.distill.prompts code (all 10) and chat (all 12) prompts"),
                train=trained.as_dict())


if __name__ == "__main__":
    main()
