"""`jaxlm generate` and `jaxlm eval` on checkpoints written here (random tiny models)."""

import json
import math

import jax
import numpy as np
import pytest

from conftest import run_cli
from jaxlm import checkpoint as ckpt
from jaxlm.cli import main
from jaxlm.config import Config, DataConfig, ModelConfig, TrainConfig
from jaxlm.tokenizer.tokenizer import EOT, Tokenizer, save_tokenizer
from jaxlm.parallel.mesh import make_mesh
from jaxlm.inference.decode import Decoder, generate
from jaxlm.checkpoint.runs import load_run
from jaxlm.inference.sampling import Sampling
from jaxlm.train.step import make_trainer

MODEL = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)


def save_run(run_dir, cfg: Config) -> str:
    """A checkpoint of the freshly initialised model, as `jaxlm train` writes one (on one device;
    it restores onto all eight)."""
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    writer = ckpt.CheckpointWriter(run_dir / ckpt.CHECKPOINTS, cfg.checkpoint)
    meta = ckpt.make_meta(cfg, 1, 0, {"next_index": 0}, ckpt.tokenizer_identity(cfg.data.tokenizer))
    writer.save(1, trainer.init_state(), meta)
    writer.close()
    return str(run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    target = save_run(root / "target", Config(model=MODEL, data=DataConfig(seq_len=32)))
    other = Tokenizer("bytes-plus", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                      special_tokens={EOT: 256, "<|pad|>": 257})
    save_tokenizer(other, str(root / "tok"))
    cfg = Config(model=ModelConfig(**{**MODEL.__dict__, "vocab_size": 258}),
                 data=DataConfig(seq_len=32, tokenizer=str(root / "tok")))
    (root / "empty").mkdir()
    mdlm = Config(model=ModelConfig(**{**MODEL.__dict__, "vocab_size": 258}), data=DataConfig(seq_len=32),
                  train=TrainConfig(objective="mdlm"))
    return {"target": target, "other_tokenizer": save_run(root / "other", cfg), "empty": str(root / "empty"),
            "mdlm": save_run(root / "mdlm", mdlm)}


def greedy_reference(run_dir: str, prompts: list[str], n: int) -> list[str]:
    run = load_run(run_dir)
    tok = run.tokenizer
    outs = generate(Decoder(run.cfg, run.params, run.mesh), [tok.encode(p) for p in prompts], n,
                    Sampling(temperature=0.0), stop_id=tok.eot_id)
    return [tok.decode(o) for o in outs]


GREEDY = ["--temperature", "0", "--max-new-tokens", "12"]


def test_generate_streams_the_greedy_continuation_and_speculative_or_batched_decoding_gives_the_same(
        runs, capsys, tmp_path):
    """One prompt streams the same text as the in-process decoder; the target as its own draft
    gives it again with every proposal accepted; in a --prompt-file batch with prompts of other
    lengths, the prompt's completion is still the same."""
    want = greedy_reference(runs["target"], ["To be, or"], 12)[0]
    assert main(["generate", runs["target"], "--prompt", "To be, or", *GREEDY]) == 0
    out = capsys.readouterr()
    assert out.out == want + "\n" and "tokens/s" in out.err
    assert main(["generate", runs["target"], "--prompt", "To be, or", *GREEDY, "--draft", runs["target"],
                 "--lookahead", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == want + "\n" and "draft acceptance 100.0%" in out.err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A\nTo be, or\nWherefore art thou\n")
    assert main(["generate", runs["target"], "--prompt-file", str(prompts), *GREEDY]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["A", "To be, or", "Wherefore art thou"]
    assert lines[1]["completion"] == want


@pytest.mark.parametrize("kind,flags", [("target", GREEDY), ("mdlm", ["--max-new-tokens", "8", "--steps", "4",
                                                                     "--block-size", "8", "--seed", "1"])])
def test_every_generator_prints_alike(runs, capsys, tmp_path, kind, flags):
    """Autoregressive and masked-diffusion runs alike: one prompt prints its continuation alone
    (the prompt not echoed) ending with a newline, the speed on a stderr line of its own; a
    --prompt-file prints one {"prompt", "completion", "stop"} line per prompt, the same rows."""
    assert main(["generate", runs[kind], "--prompt", "To be", *flags]) == 0
    one = capsys.readouterr()
    assert one.out.endswith("\n") and not one.out.startswith("To be") and "tokens/s" in one.err.splitlines()[-1]
    assert all(line.startswith("jaxlm: ") for line in one.err.splitlines())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be\nA\n")
    assert main(["generate", runs[kind], "--prompt-file", str(prompts), *flags]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [sorted(line) for line in lines] == [["completion", "prompt", "stop"]] * 2
    assert lines[0]["completion"] + "\n" == one.out and lines[0]["stop"] in ("length", "<|endoftext|>")


def test_generate_int8_keeps_the_logits_close_and_prints_the_int8_greedy_text(runs, capsys):
    """Along the f32 greedy continuation, the int8 model's logits stay within 3% (relative L2) of
    f32's at every position; the CLI's int8 text is the in-process int8 model's greedy text (the
    embedding is quantized too since compress/, so near ties of this random model may flip a token
    against f32: the quality bound, not token equality, is what int8 promises)."""
    from jaxlm.compress.quantize import quantize_params

    run = load_run(runs["target"])
    prompt = run.tokenizer.encode("ab")
    dec, qdec = Decoder(run.cfg, run.params, run.mesh), Decoder(run.cfg, quantize_params(run.params, run.cfg, "int8"), run.mesh)
    (ids,) = generate(dec, [prompt], 12, Sampling(temperature=0.0), stop_id=run.tokenizer.eot_id)
    (qids,) = generate(qdec, [prompt], 12, Sampling(temperature=0.0), stop_id=run.tokenizer.eot_id)
    tokens = np.array([prompt + ids], np.int32)
    positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
    f32 = np.asarray(jax.jit(dec.forward)(dec.params, tokens, positions, dec.new_caches(1, 32))[0])[0]
    int8 = np.asarray(jax.jit(qdec.forward)(qdec.params, tokens, positions, qdec.new_caches(1, 32))[0])[0]
    rel = np.linalg.norm(int8 - f32, axis=-1) / np.linalg.norm(f32, axis=-1)
    assert np.all(rel < 0.03), rel.max()

    assert main(["generate", runs["target"], "--prompt", "ab", *GREEDY, "--quantize", "int8"]) == 0
    out = capsys.readouterr()
    assert out.out == run.tokenizer.decode(qids) + "\n"
    ratio = float(out.err.split("MiB saved, ")[1].split("x smaller")[0])
    assert ratio > 2.0


@pytest.mark.parametrize("scheme,smaller", [("int4-g32", 6.0)])
def test_generate_quantized_reports_the_weight_memory_saved(runs, capsys, scheme, smaller):
    assert main(["generate", runs["target"], "--prompt", "To be", *GREEDY, "--quantize", scheme]) == 0
    err = capsys.readouterr().err
    ratio = float(err.split("MiB saved, ")[1].split("x smaller")[0])
    assert ratio > smaller


def cross_entropy(model, tokens: np.ndarray, seq_len: int) -> float:
    """Summed next-token loss of `tokens` in windows of seq_len, by hand."""
    ce = 0.0
    for start in range(0, len(tokens) - 1, seq_len):
        seg = tokens[start: start + seq_len + 1]
        logp = jax.nn.log_softmax(np.asarray(model(seg[None, :-1])[0][0], np.float64), axis=-1)
        ce -= float(np.sum(np.take_along_axis(np.asarray(logp), seg[1:, None], axis=-1)))
    return ce


@pytest.mark.parametrize("scheme", [None, "int4-g32"])
def test_eval_reports_the_loss_perplexity_and_bits_per_byte_of_every_token_once(runs, capsys, tmp_path, scheme):
    """70 bytes + <|endoftext|> in rows of 32: windows [0:33], [32:65] and a last row [64:71].
    --quantize: the loss of the model holding the dequantized weights (not the f32 model's)."""
    text = "Now is the winter of our discontent made glorious summer by this sun."
    (tmp_path / "t.txt").write_text(text)
    assert main(["eval", runs["target"], "--data", str(tmp_path / "t.txt")] + ["--quantize", scheme] * bool(scheme)) == 0
    got = json.loads(capsys.readouterr().out)
    run = load_run(runs["target"])
    tokens = np.array(run.tokenizer.encode(text) + [run.tokenizer.eot_id])
    model = run.model()  # the loaded module, computed here by hand; eval goes through the trainer's eval step
    n = len(tokens) - 1
    if scheme:
        from flax import nnx

        from jaxlm.compress.quantize import dequantize_params, quantize_params

        f32_loss = cross_entropy(model, tokens, 32) / n
        model = nnx.merge(nnx.graphdef(model), dequantize_params(quantize_params(run.params, run.cfg, scheme)))
        assert got.get("quantize") == scheme and abs(got["loss"] - f32_loss) > 1e-4
    ce = cross_entropy(model, tokens, 32)
    assert got["tokens"] == n and got["bytes"] == len(text) - 1  # the first byte is context, the EOT 0 bytes
    assert got["loss"] == pytest.approx(ce / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(ce / n), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(ce / math.log(2) / (len(text) - 1), rel=1e-5)


def test_bad_input_exits_2_with_one_line(runs, capsys, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    not_chat = tmp_path / "not_chat.jsonl"
    not_chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"prompt": "hi"}\n')
    cases = [
        (["generate", runs["empty"], "--prompt", "x"], "no checkpoints"),
        (["generate", runs["target"], "--prompt", "x" * 40], "more than the model's max_seq_len=32"),
        (["generate", runs["target"], "--prompt", "x", "--draft", runs["other_tokenizer"]], "tokenizer"),
        (["eval", runs["target"], "--data", str(tmp_path / "missing.txt")], "no such file"),
        (["generate", runs["target"], "--prompt", "x", "--sampler", "llada", "--steps", "8"],
         "--sampler, --steps: not used by " + runs["target"] + ", a train.objective=next_token run; its generator "
         "reads --top-k, --top-p, --draft, --lookahead, --quantize"),
        (["generate", runs["target"], "--prompt", "x", "--lookahead", "3"], "give --draft DRAFT_RUN_DIR too"),
        (["generate", runs["target"], "--prompt", "x", "--temperature", "nan"], "must be a finite number >= 0"),
        (["generate", runs["target"], "--prompt-file", str(latin1)], "is not UTF-8 text (byte 3)"),
        (["generate", runs["mdlm"], "--prompt", "x", "--chat"], "--chat: not used by " + runs["mdlm"]),
        (["generate", runs["target"], "--prompt", "x", "--min-new-tokens", "13", "--max-new-tokens", "12"],
         "--min-new-tokens 13 is more than the 12 new tokens asked for"),
        (["generate", runs["target"], "--chat", "--prompt-file", str(not_chat)],
         '--prompt-file ' + str(not_chat) + ' line 2: expected {"messages": '),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)
    result = run_cli("generate", runs["empty"], "--prompt", "x")  # the same as a real process
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("jaxlm generate: error:")
