"""`jaxlm generate RUN_DIR --prompt TEXT`: text from a checkpoint.

How a checkpoint generates depends on what it was trained for: GENERATORS maps the run's
train.objective to its generator (next_token: the autoregressive KV-cache decoder below; other
objectives, e.g. masked diffusion, add their own row).

One prompt: its continuation streams to stdout. --prompt-file: one prompt per line, decoded as
one batch, one JSON line {"prompt", "completion"} each. The decode speed goes to stderr.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
import time
from typing import Callable

from jaxlm import checkpoint as ckpt
from jaxlm.errors import UserError
from jaxlm.checkpoint.runs import Run, load_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (with checkpoints/) written by `jaxlm train`")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue")
    src.add_argument("--prompt-file", help="a text file with one prompt per line, decoded as one batch")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per prompt (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=ckpt.step_arg,
                        help="the checkpoint step to load, or 'best' (lowest eval loss); default: the newest valid one")
    parser.add_argument("--draft", metavar="DRAFT_RUN_DIR", help="speculative decoding with this draft model")
    parser.add_argument("--lookahead", type=int, default=4, help="draft tokens proposed per round (default 4)")
    from jaxlm.compress.schemes import SCHEMES

    parser.add_argument("--quantize", choices=list(SCHEMES), metavar="SCHEME",
                        help=f"weight-only quantized decoding: {', '.join(SCHEMES)} (int4-g32 is llama.cpp's Q4_0)")
    from jaxlm.inference.diffusion import add_arguments as add_diffusion_arguments

    add_diffusion_arguments(parser)  # --sampler, --steps, --block-size for masked-diffusion checkpoints


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"--prompt-file {args.prompt_file}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt-file {args.prompt_file} is not UTF-8 text (byte {e.start}); expected one prompt "
                        "per line") from None
    if not prompts:
        raise UserError(f"--prompt-file {args.prompt_file} holds no prompt; expected one prompt per line")
    return prompts


def say(msg: str) -> None:
    print(f"jaxlm: {msg}", file=sys.stderr, flush=True)


def autoregressive(args, run: Run) -> int:
    """The KV-cache decoder, with --draft (speculative) and --quantize (weight-only schemes)."""
    from jaxlm.inference.decode import Decoder, generate
    from jaxlm.inference.sampling import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    tok = run.tokenizer
    texts = read_prompts(args)
    prompts = [tok.encode(t, allowed_special="all") or [tok.eot_id] for t in texts]
    params = run.params
    if args.quantize:
        from jaxlm.compress.quantize import quantize_params, weight_bytes

        before = weight_bytes(params)
        params = quantize_params(params, run.cfg, args.quantize)
        after = weight_bytes(params)
        say(f"{args.quantize} weights: {after / 2**20:.1f} MiB instead of {before / 2**20:.1f} MiB "
            f"({(before - after) / 2**20:.1f} MiB saved, {before / after:.2f}x smaller)")
    target = Decoder(run.cfg, params, run.mesh)
    draft = None
    if args.draft:
        from jaxlm.inference.speculative import check_pair

        draft_run = load_run(args.draft, mesh=run.mesh)
        draft = Decoder(draft_run.cfg, draft_run.params, run.mesh)
        check_pair(target, draft, tok, draft_run.tokenizer)

    stream = len(prompts) == 1
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    clock = {"first": None, "n": 0}

    def on_tokens(row: int, new: list[int]) -> None:
        clock["first"] = clock["first"] or time.perf_counter()
        clock["n"] += len(new)
        if stream:
            sys.stdout.write(utf8.decode(b"".join(tok.decode_single_token_bytes(t) for t in new)))
            sys.stdout.flush()

    start = time.perf_counter()
    if draft is None:
        outputs = generate(target, prompts, args.max_new_tokens, sampling, args.seed, tok.eot_id, on_tokens)
        extra = ""
    else:
        from jaxlm.inference.speculative import speculative_generate

        outputs, stats = speculative_generate(target, draft, prompts, args.max_new_tokens, args.lookahead,
                                              sampling, args.seed, tok.eot_id, on_tokens)
        extra = f", draft acceptance {stats.acceptance_rate:.1%} over {stats.rounds} rounds"
    end = time.perf_counter()
    if stream:
        sys.stdout.write(utf8.decode(b"", final=True) + "\n")
    else:
        for text, out in zip(texts, outputs):
            print(json.dumps({"prompt": text, "completion": tok.decode(out)}, ensure_ascii=False))
    n = sum(map(len, outputs))
    rate = (clock["n"] - len(prompts)) / (end - clock["first"]) if clock["first"] and end > clock["first"] else 0.0
    say(f"{n} tokens for {len(prompts)} prompt(s) in {end - start:.2f} s; {rate:.1f} tokens/s after the first "
        f"(which took {(clock['first'] or end) - start:.2f} s, compilation included){extra}")
    return 0


def masked_diffusion(args, run: Run) -> int:
    """mdlm checkpoints: --sampler mdlm | llada | block, --steps, --block-size (inference/diffusion.py)."""
    from jaxlm.inference.diffusion import generate_mdlm

    model = run.model()
    for prompt in read_prompts(args):
        generate_mdlm(model, run.cfg, run.tokenizer, prompt, args)
    return 0


# train.objective -> generator(args, run) -> exit code; a distilled student is a next-token model
GENERATORS: dict[str, Callable[[argparse.Namespace, Run], int]] = {
    "next_token": autoregressive, "distill": autoregressive, "mdlm": masked_diffusion}


# the flags only one generator reads (the prompt, --max-new-tokens, --temperature, --seed and --step
# are everyone's): given to a run whose generator does not read them, they are refused, not ignored
READS = {autoregressive: ("top_k", "top_p", "draft", "lookahead", "quantize"),
         masked_diffusion: ("sampler", "steps", "block_size")}


def refuse_unread_flags(args: argparse.Namespace, generator, objective: str) -> None:
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    unread = [name for other, names in READS.items() if other is not generator for name in names
              if getattr(args, name) != defaults.get_default(name)]
    if unread:
        flags = ", ".join("--" + name.replace("_", "-") for name in unread)
        raise UserError(f"{flags}: not used by {args.run_dir}, a train.objective={objective} run; "
                        f"its generator reads {', '.join('--' + n.replace('_', '-') for n in READS[generator])}")
    if generator is autoregressive and args.lookahead != defaults.get_default("lookahead") and not args.draft:
        raise UserError("--lookahead sets the draft tokens of speculative decoding; give --draft DRAFT_RUN_DIR too")


def main(args: argparse.Namespace) -> int:
    from jaxlm.inference.sampling import Sampling

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be >= 0")
    Sampling(args.temperature, args.top_k, args.top_p)  # checks the values before the checkpoint is read
    run = load_run(args.run_dir, args.step)
    objective = run.cfg.train.objective
    if objective not in GENERATORS:
        raise UserError(f"{args.run_dir} was trained for train.objective={objective!r}, which has no generator; "
                        f"known: {', '.join(GENERATORS)}")
    refuse_unread_flags(args, GENERATORS[objective], objective)
    return GENERATORS[objective](args, run)
