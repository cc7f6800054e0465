"""`jaxlm generate --chat` and budget forcing (--min-new-tokens, --max-thinking-tokens) on tiny
random checkpoints, one of them edited so that end-of-text is what it always says next."""

import json

import jax
import numpy as np
import pytest

from jaxlm.checkpoint.runs import load_run, write_step0
from jaxlm.cli import main
from jaxlm.config import Config, DataConfig, ModelConfig, TrainConfig
from jaxlm.data.chat import chat_format, render
from jaxlm.inference.budget import Budget, StepControls, mask_stop
from jaxlm.inference.decode import Decoder, generate
from jaxlm.inference.sampling import Sampling
from jaxlm.parallel.mesh import make_mesh
from jaxlm.train.step import make_trainer
from test_generate_cli import MODEL, save_run

GREEDY = Sampling(temperature=0.0)
CUE = "\nFinal answer:"


def save_eot_loving_run(run_dir, cfg: Config, eot: int) -> str:
    """A run whose every next token is end-of-text: every embedding gets a large constant in
    dimension 0, which so dominates the final norm's output there, and the output projection
    reads dimension 0 into end-of-text's logit alone."""
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    params = trainer.jit_init_params()
    params["embed"]["table_VD"] = params["embed"]["table_VD"].at[:, 0].set(10.0)
    params["lm_head_DV"] = params["lm_head_DV"].at[0, :].set(0.0).at[0, eot].set(10.0)
    write_step0(run_dir, cfg, params, trainer)
    return str(run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_runs")
    model = ModelConfig(**{**MODEL.__dict__, "max_seq_len": 128})  # bytes: a chat prompt is ~50 tokens
    cfg = Config(model=model, data=DataConfig(seq_len=32), train=TrainConfig(objective="sft"))  # as SFT left it
    random_run = save_run(root / "random", cfg)
    eot = load_run(random_run).tokenizer.eot_id
    return {"random": random_run, "eot_loving": save_eot_loving_run(root / "eot_loving", cfg, eot)}


def decoder(run_dir):
    run = load_run(run_dir)
    return Decoder(run.cfg, run.params, run.mesh), run.tokenizer


def test_the_stop_mask_sets_the_stop_logit_to_minus_infinity_in_suppressing_rows_only():
    logits = np.arange(12, dtype=np.float32).reshape(2, 6)
    c = StepControls(np.array([True, False]), np.full(2, -1, np.int32), np.int32(3))
    masked = np.asarray(mask_stop(logits, c))
    assert masked[0, 3] == -np.inf and np.all(np.delete(masked[0], 3) == np.delete(logits[0], 3))
    assert np.all(masked[1] == logits[1])


def test_min_new_tokens_keeps_end_of_text_out_of_the_first_n_tokens(runs):
    """The edited model says end-of-text at once; with min_new=N no row has it among its first N
    tokens, greedy or sampled, and each goes on to at least N tokens."""
    dec, tok = decoder(runs["eot_loving"])
    prompts = [tok.encode("To be"), tok.encode("Wherefore art")]
    plain = generate(dec, prompts, 10, GREEDY, stop_id=tok.eot_id)
    assert plain == [[], []] and plain.stopped.all()  # without forcing: stopped before a first token
    for n, sampling in [(1, GREEDY), (6, GREEDY), (6, Sampling(temperature=1.0))]:
        out = generate(dec, prompts, 10, sampling, seed=3, stop_id=tok.eot_id, budget=Budget(min_new=n))
        for row in range(2):  # end-of-text is cut, so it would show as a row shorter than n
            assert len(out[row]) >= n and tok.eot_id not in out[row], (n, out)
        assert out.stopped.all()  # and the model says it as soon as it may


def test_max_thinking_tokens_puts_the_cue_at_token_n_and_then_answers(runs):
    """Thinking is the unforced greedy text's first N tokens, the cue's tokens are new tokens
    N .. N+len(cue)-1, then up to max_new answer tokens follow."""
    dec, tok = decoder(runs["random"])
    prompt, cue, n = [tok.encode("To be, or")], tok.encode(CUE), 5
    free = generate(dec, prompt, 20, GREEDY)[0]
    (out,) = generate(dec, prompt, 4, GREEDY, budget=Budget(think=n, cue=tuple(cue)))
    assert out[:n] == free[:n] and out[n: n + len(cue)] == cue and len(out) == n + len(cue) + 4


def test_the_cli_forces_the_budget_and_refuses_bad_combinations_in_one_line(runs, capsys):
    """The eot-loving model thinks for 6 tokens, gets the cue, then ends its answer at once."""
    dec, tok = decoder(runs["eot_loving"])
    argv = ["generate", runs["eot_loving"], "--prompt", "To be", "--temperature", "0", "--max-new-tokens", "8"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out == "\n" and "stopped at <|endoftext|> after 0 new tokens" in out.err
    assert main(argv + ["--min-new-tokens", "6", "--max-thinking-tokens", "6"]) == 0
    out = capsys.readouterr()
    (thought,) = generate(dec, [tok.encode("To be")], 6, GREEDY, stop_id=tok.eot_id, budget=Budget(min_new=6))
    assert out.out == tok.decode(thought) + CUE + "\n" and f"after {6 + len(tok.encode(CUE))} new tokens" in out.err
    cases = [(argv + ["--min-new-tokens", "9"], "--min-new-tokens 9 is more than the 8 new tokens asked for"),
             (argv + ["--max-thinking-tokens", "2", "--draft", runs["random"]], "not supported with --draft"),
             (["generate", runs["random"]], "give --prompt TEXT or --prompt-file FILE (or --chat alone")]
    for case, words in cases:
        assert main(case) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_chat_renders_the_prompt_as_sft_does_and_prints_the_reply_alone(runs, capsys, tmp_path):
    """--chat's prompt tokens are the SFT render's tokens before the assistant's (the same
    function, the same pieces); the reply is the greedy continuation of them, printed alone."""
    dec, tok = decoder(runs["random"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    sft = render(messages + [{"role": "assistant", "content": "4"}], chat_format(tok))
    prompt = sft.tokens[: int(np.argmax(sft.mask))].tolist()  # up to the first trained (assistant) token
    (reply,) = generate(dec, [prompt], 6, GREEDY, stop_id=tok.eot_id)
    record = tmp_path / "chat.jsonl"
    record.write_text(json.dumps({"messages": messages + [{"role": "assistant", "content": "4"}]}) + "\n"
                      + json.dumps({"messages": messages}) + "\n")
    assert main(["generate", runs["random"], "--chat", "--prompt-file", str(record), "--temperature", "0",
                 "--max-new-tokens", "6"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["messages"] for line in lines] == [messages, messages]  # an answer given is dropped
    assert [line["completion"] for line in lines] == [tok.decode(reply)] * 2


def test_chat_stops_at_the_end_of_turn(runs, capsys):
    """The eot-loving model ends its turn at once (the default template's end-of-turn is
    <|endoftext|>); the reply is empty, a line of its own, and the stop is said."""
    assert main(["generate", runs["eot_loving"], "--chat", "--prompt", "hello", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out == "\n" and "stopped at <|endoftext|> after 0 new tokens" in out.err


def test_chat_alone_converses_on_stdin_each_reply_joining_the_conversation(runs, capsys, monkeypatch):
    """Each stdin line is a user turn whose prompt holds the conversation so far, replies
    included; the CLI prints each reply on its own line."""
    import io

    from jaxlm.data.chat import prompt_tokens
    from jaxlm.inference.prompts import converse

    run = load_run(runs["random"])
    tok, fmt, seen = run.tokenizer, chat_format(run.tokenizer), []
    converse(tok, run.cfg, lambda p: seen.append(p) or [tok.encode(f"ok{len(seen)}")], ["hi\n", "\n", "again\n"])
    want = [[{"role": "user", "content": "hi"}],
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok1"},
             {"role": "user", "content": "again"}]]
    assert [p.labels[0] for p in seen] == want and all(p.stop_id == tok.eot_id for p in seen)
    assert [p.tokens[0] for p in seen] == [prompt_tokens(m, fmt).tolist() for m in want]

    dec = Decoder(run.cfg, run.params, run.mesh)
    (r1,) = generate(dec, [prompt_tokens(want[0], fmt).tolist()], 4, GREEDY, stop_id=tok.eot_id)
    second = want[0] + [{"role": "assistant", "content": tok.decode(r1)}, {"role": "user", "content": "again"}]
    (r2,) = generate(dec, [prompt_tokens(second, fmt).tolist()], 4, GREEDY, stop_id=tok.eot_id)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nagain\n"))
    assert main(["generate", runs["random"], "--chat", "--temperature", "0", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == tok.decode(r1) + "\n" + tok.decode(r2) + "\n"
