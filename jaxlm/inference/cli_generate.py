"""`jaxlm generate RUN_DIR --prompt TEXT`: text from a checkpoint.

How a checkpoint generates depends on what it was trained for: GENERATORS maps the run's
train.objective to its generator (next_token: the autoregressive KV-cache decoder below; other
objectives, e.g. masked diffusion, add their own row).

Every generator prints alike (report.py): the continuation alone, ending with a newline, or one
JSON line per prompt of a --prompt-file; speed and stops on stderr. --chat renders the prompts with
the run's chat template and stops at its end-of-turn (prompts.py); --min-new-tokens and
--max-thinking-tokens force a thinking budget (budget.py).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

from jaxlm import checkpoint as ckpt
from jaxlm.errors import UserError
from jaxlm.checkpoint.runs import Run, load_run
from jaxlm.inference.report import Stream, print_completions, say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (with checkpoints/) written by `jaxlm train`")
    src = parser.add_mutually_exclusive_group()  # neither, with --chat: a conversation on stdin
    src.add_argument("--prompt", help="the text to continue (with --chat: one user message)")
    src.add_argument("--prompt-file", help="a text file with one prompt per line, decoded as one batch "
                                           '(with --chat: one {"messages": [...]} per line)')
    parser.add_argument("--chat", action="store_true",
                        help="render the prompts with the run's chat template (as SFT does), print the reply; "
                             "without --prompt or --prompt-file: a conversation, one user message per stdin line")
    parser.add_argument("--min-new-tokens", type=int, default=0, metavar="N",
                        help="budget forcing: no end-of-text (end-of-turn) before N new tokens")
    parser.add_argument("--max-thinking-tokens", type=int, metavar="N",
                        help="budget forcing: after N new tokens append --answer-cue, then up to --max-new-tokens more")
    parser.add_argument("--answer-cue", default="\nFinal answer:",
                        help="what ends the thinking; a typed \\n is a newline (default: '\\nFinal answer:')")
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


def budget_flags(args) -> tuple[int, int | None]:
    """(--min-new-tokens, --max-thinking-tokens), checked against --max-new-tokens and each other."""
    if args.min_new_tokens < 0 or (args.max_thinking_tokens is not None and args.max_thinking_tokens < 1):
        raise UserError("--min-new-tokens must be >= 0 and --max-thinking-tokens >= 1")
    limit = args.max_new_tokens if args.max_thinking_tokens is None else args.max_thinking_tokens + args.max_new_tokens
    if args.min_new_tokens > limit:
        raise UserError(f"--min-new-tokens {args.min_new_tokens} is more than the {limit} new tokens asked for "
                        "(--max-new-tokens, plus --max-thinking-tokens when given)")
    if args.draft and (args.min_new_tokens or args.max_thinking_tokens is not None):
        raise UserError("--min-new-tokens and --max-thinking-tokens are not supported with --draft")
    return args.min_new_tokens, args.max_thinking_tokens


def make_budget(args, tok):
    from jaxlm.inference.budget import Budget

    min_new, think = budget_flags(args)
    cue_text = args.answer_cue.replace("\\n", "\n")  # a shell passes "\n" as two characters
    cue = tuple(tok.encode(cue_text, allowed_special="all")) if think is not None else ()
    return Budget(min_new, think, cue)


def quantized(args, run: Run) -> dict:
    if not args.quantize:
        return run.params
    from jaxlm.compress.quantize import quantize_params, weight_bytes

    before = weight_bytes(run.params)
    params = quantize_params(run.params, run.cfg, args.quantize)
    after = weight_bytes(params)
    say(f"{args.quantize} weights: {after / 2**20:.1f} MiB instead of {before / 2**20:.1f} MiB "
        f"({(before - after) / 2**20:.1f} MiB saved, {before / after:.2f}x smaller)")
    return params


def decoders(args, run: Run):
    """The target Decoder (--quantize'd) and the --draft one (or None)."""
    from jaxlm.inference.decode import Decoder

    target = Decoder(run.cfg, quantized(args, run), run.mesh)
    if not args.draft:
        return target, None
    from jaxlm.inference.speculative import check_pair

    draft_run = load_run(args.draft, mesh=run.mesh)
    draft = Decoder(draft_run.cfg, draft_run.params, run.mesh)
    check_pair(target, draft, run.tokenizer, draft_run.tokenizer)
    return target, draft


def autoregressive(args, run: Run) -> int:
    """The KV-cache decoder, with --chat (a file, a message, or a conversation on stdin), budget
    forcing, --draft (speculative) and --quantize."""
    from jaxlm.inference.prompts import chat_prompts, converse, plain_prompts
    from jaxlm.inference.sampling import Sampling

    tok, sampling = run.tokenizer, Sampling(args.temperature, args.top_k, args.top_p)
    budget = make_budget(args, tok)
    target, draft = decoders(args, run)
    decode = lambda prompts: decode_and_print(args, prompts, target, draft, tok, sampling, budget)  # noqa: E731
    if args.chat and args.prompt is None and args.prompt_file is None:
        converse(tok, run.cfg, decode)
    else:
        decode(chat_prompts(args, tok, run.cfg) if args.chat else plain_prompts(args, tok))
    return 0


def decode_and_print(args, prompts, target, draft, tok, sampling, budget):
    """Decodes the prompts (one streams), prints them and the speed; returns the Completions."""
    from jaxlm.inference.decode import generate

    stream = Stream(tok) if len(prompts.tokens) == 1 else None
    clock = {"first": None, "n": 0}

    def on_tokens(row: int, new: list[int]) -> None:
        clock["first"] = clock["first"] or time.perf_counter()
        clock["n"] += len(new)
        if stream:
            stream.write(new)

    start = time.perf_counter()
    if draft is None:
        outputs = generate(target, prompts.tokens, args.max_new_tokens, sampling, args.seed, prompts.stop_id,
                           on_tokens, budget=budget)
        extra = ""
    else:
        from jaxlm.inference.speculative import speculative_generate

        outputs, stats = speculative_generate(target, draft, prompts.tokens, args.max_new_tokens, args.lookahead,
                                              sampling, args.seed, prompts.stop_id, on_tokens)
        extra = f", draft acceptance {stats.acceptance_rate:.1%} over {stats.rounds} rounds"
    end = time.perf_counter()
    print_completions(prompts.labels, outputs, outputs.stopped, tok, prompts.stop_id, prompts.key, stream)
    n, rows = sum(map(len, outputs)), len(prompts.tokens)
    rate = (clock["n"] - rows) / (end - clock["first"]) if clock["first"] and end > clock["first"] else 0.0
    say(f"{n} tokens for {rows} prompt(s) in {end - start:.2f} s; {rate:.1f} tokens/s after the first "
        f"(which took {(clock['first'] or end) - start:.2f} s, compilation included){extra}")
    return outputs


def masked_diffusion(args, run: Run) -> int:
    """mdlm checkpoints: --sampler mdlm | llada | block, --steps, --block-size (inference/diffusion.py)."""
    from jaxlm.inference.diffusion import completion, generate_mdlm, speed
    from jaxlm.inference.prompts import read_prompts

    model, tok = run.model(), run.tokenizer
    texts, completions, stopped = read_prompts(args), [], []
    for prompt in texts:
        sample = generate_mdlm(model, run.cfg, tok, prompt, args)
        ids, stop = completion(sample, tok.eot_id)
        completions.append(ids)
        stopped.append(stop)
        say(speed(args.sampler, sample))
    print_completions(texts, completions, stopped, tok, tok.eot_id)
    return 0


# train.objective -> generator(args, run) -> exit code; a distilled student and a fine-tuned
# (sft, dpo) model are next-token models
GENERATORS: dict[str, Callable[[argparse.Namespace, Run], int]] = {
    "next_token": autoregressive, "distill": autoregressive, "sft": autoregressive, "dpo": autoregressive,
    "mdlm": masked_diffusion}


# the flags only one generator reads (the prompt, --max-new-tokens, --temperature, --seed and --step
# are everyone's): given to a run whose generator does not read them, they are refused, not ignored
READS = {autoregressive: ("top_k", "top_p", "draft", "lookahead", "quantize", "chat", "min_new_tokens",
                          "max_thinking_tokens", "answer_cue"),
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
    budget_flags(args)
    if args.prompt is None and args.prompt_file is None and not args.chat:
        raise UserError("give --prompt TEXT or --prompt-file FILE (or --chat alone, to converse on stdin)")
    run = load_run(args.run_dir, args.step)
    objective = run.cfg.train.objective
    if objective not in GENERATORS:
        raise UserError(f"{args.run_dir} was trained for train.objective={objective!r}, which has no generator; "
                        f"known: {', '.join(GENERATORS)}")
    refuse_unread_flags(args, GENERATORS[objective], objective)
    return GENERATORS[objective](args, run)
