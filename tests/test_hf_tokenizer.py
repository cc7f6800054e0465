"""A Hugging Face tokenizer.json as a jaxlm tokenizer: the ids transformers gives, its eos/bos/chat
template, a content hash, and the whole path (prepare, train, export to transformers and llama.cpp).

The tokenizers are trained here on TinyShakespeare with the `tokenizers` library and saved by
transformers (`save_pretrained`), as a model directory holds them: a byte-level BPE (Llama 3 /
Qwen2 style) and a SentencePiece-style BPE with '▁' and byte fallback (Llama 2 / Mistral style,
its merges completed the way the Llama 2 conversion writes them).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, llama_cpp, run_cli

from jaxlm.errors import UserError
from jaxlm.tokenizer.hf import HFTokenizer
from jaxlm.tokenizer.tokenizer import Tokenizer, byte_tokenizer, load_tokenizer, save_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
GERMAN = SHARED_DATA / "cs336_fixtures" / "german.txt"
EMOJI_CJK = "Hello 👋🏽 世界! こんにちは 🇩🇪 — naïve café 日本語のテキスト 😀🎉 한국어 ✓\n"
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
KINDS = ["byte_level", "sentencepiece"]
SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
         "data.seq_len=64", "model.max_seq_len=64", "train.global_batch=8", "train.progress=false",
         "train.peak_flops_per_device=1e11", "train.eval_every=0", "checkpoint.async_save=false"]


def texts() -> dict[str, str]:
    if not SHAKESPEARE.is_file() or not GERMAN.is_file():
        pytest.skip(f"shared data not found under {SHARED_DATA}")
    return {"shakespeare": SHAKESPEARE.read_text(encoding="utf-8"), "german": GERMAN.read_text(encoding="utf-8"),
            "emoji_cjk": EMOJI_CJK}


def _byte_level(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.train([str(SHAKESPEARE)], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>",
                                         chat_template=CHAT).save_pretrained(out)


def _sentencepiece(out: Path, complete_merges: bool) -> None:
    """BPE over '▁'-marked words, unknown characters as <0xNN> byte tokens (ids 3..258, as Llama's),
    a post-processor that puts <s> first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = metaspace
    tk.train([str(SHAKESPEARE)], trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"],
                                                     limit_alphabet=70, show_progress=False))
    trained = json.loads(tk.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) for m in trained["merges"]]
    if complete_merges:  # every split of a token into two tokens, ordered by the token made
        merges = [pair for piece in sorted(vocab, key=vocab.get) for pair in sorted(
            ((piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab),
            key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))]
    sp = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    sp.pre_tokenizer = metaspace
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    sp.add_special_tokens(["<unk>", "<s>", "</s>"])
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                         chat_template=CHAT).save_pretrained(out)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """kind -> a Hugging Face tokenizer directory (made once per module)."""
    texts()  # skips without the shared data
    root = tmp_path_factory.mktemp("hf_tokenizers")

    @functools.cache
    def make(kind: str) -> Path:
        out = root / kind
        if kind == "byte_level":
            _byte_level(out)
        else:
            _sentencepiece(out, complete_merges=kind == "sentencepiece")
        return out

    return make


@functools.cache
def auto(directory: Path):
    return transformers.AutoTokenizer.from_pretrained(directory)


# ----------------------------------------------------------------------------- the tokenizer


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", ["shakespeare", "german", "emoji_cjk"])
def test_ids_equal_transformers_and_decode_round_trips(hf_dir, kind, text):
    tok, hf = load_tokenizer(str(hf_dir(kind))), auto(hf_dir(kind))
    t = texts()[text]
    ids = tok.encode(t)
    assert isinstance(tok, HFTokenizer) and ([tok.bos_id] if tok.add_bos else []) + ids == hf(t)["input_ids"]
    assert tok.decode(ids) == t == hf.decode(ids)
    assert tok.encode_ordinary_batch([t[:5000], t[:100]]) == [tok.encode(t[:5000]), tok.encode(t[:100])]
    spelled = b"".join(tok.decode_single_token_bytes(i) for i in ids)  # what eval counts as bytes
    assert spelled == (b" " if kind == "sentencepiece" else b"") + t.encode("utf-8")  # '▁' prepended


def test_eos_bos_and_chat_template_come_from_the_directory(hf_dir, tmp_path):
    bl, sp = load_tokenizer(str(hf_dir("byte_level"))), load_tokenizer(str(hf_dir("sentencepiece")))
    assert (bl.eot_token, bl.bos_id, bl.add_bos) == ("<|im_end|>", None, False)  # eos_token of tokenizer_config
    assert (sp.eot_token, sp.bos_id, sp.add_bos) == ("</s>", 1, True)
    assert bl.eot_id == bl.special_tokens["<|im_end|>"] == auto(hf_dir("byte_level")).eos_token_id
    assert bl.chat_template == sp.chat_template == CHAT
    # a bare tokenizer.json: eos is looked up, BOS read from the post-processor; no chat template
    for kind, eos in (("byte_level", "<|endoftext|>"), ("sentencepiece", "</s>")):
        (tmp_path / kind).mkdir()
        shutil.copy(hf_dir(kind) / "tokenizer.json", tmp_path / kind / "tokenizer.json")
        bare = load_tokenizer(str(tmp_path / kind / "tokenizer.json"))
        assert bare.eot_token == eos and bare.chat_template is None
        assert (bare.bos_id, bare.add_bos) == ((1, True) if kind == "sentencepiece" else (None, False))


def test_special_tokens_follow_tiktoken_rules(hf_dir):
    tok = load_tokenizer(str(hf_dir("byte_level")))
    text = "to be<|im_end|>or not"
    with pytest.raises(ValueError, match="special token '<\\|im_end\\|>'"):
        tok.encode(text)
    special = tok.encode(text, allowed_special="all")
    assert special == auto(hf_dir("byte_level"))(text, add_special_tokens=False)["input_ids"]
    assert special.count(tok.eot_id) == 1
    plain = tok.encode(text, disallowed_special=())
    assert tok.eot_id not in plain and tok.decode(plain) == text
    assert tok.encode_ordinary(text) == plain


def test_a_pickled_tokenizer_keeps_its_special_token_rules(hf_dir):
    """prepare's workers get the tokenizer pickled where processes are spawned (macOS, or once
    jax is imported)."""
    import pickle

    tok = load_tokenizer(str(hf_dir("byte_level")))
    back = pickle.loads(pickle.dumps(tok))
    text = "to be<|im_end|>or not" + EMOJI_CJK
    for kw in ({"disallowed_special": ()}, {"allowed_special": "all"}):
        assert back.encode(text, **kw) == tok.encode(text, **kw)
    assert (back.hash, back.eot_id, back.bos_id, back.chat_template) == (tok.hash, tok.eot_id, tok.bos_id, CHAT)


def test_hash_is_of_the_content_not_its_formatting_name_or_path(hf_dir, tmp_path):
    original = hf_dir("byte_level")
    tok = load_tokenizer(str(original))
    config = json.loads((original / "tokenizer.json").read_text(encoding="utf-8"))
    (tmp_path / "same").mkdir()
    (tmp_path / "same" / "tokenizer.json").write_text(json.dumps(config, indent=4, sort_keys=True))
    shutil.copy(original / "tokenizer_config.json", tmp_path / "same")
    assert load_tokenizer(str(tmp_path / "same")).hash == tok.hash == load_tokenizer(str(original / "tokenizer.json")).hash
    config["model"]["merges"] = config["model"]["merges"][:-1]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(config))
    shutil.copy(original / "tokenizer_config.json", tmp_path / "other")
    assert load_tokenizer(str(tmp_path / "other")).hash != tok.hash


def test_jaxlm_directories_still_load_as_tiktoken_and_are_not_mistaken(hf_dir, tmp_path):
    save_tokenizer(byte_tokenizer(), str(tmp_path / "jaxlm"))
    mine = load_tokenizer(str(tmp_path / "jaxlm"))
    assert isinstance(mine, Tokenizer) and mine.hash == byte_tokenizer().hash
    (tmp_path / "jaxlm" / "tokenizer.tiktoken").unlink()  # a jaxlm tokenizer.json alone is still jaxlm's
    with pytest.raises(UserError, match="tokenizer directory .* is not readable"):
        load_tokenizer(str(tmp_path / "jaxlm"))
    assert isinstance(load_tokenizer(str(hf_dir("byte_level"))), HFTokenizer)
    (tmp_path / "junk.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(UserError, match="is not a Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path / "junk.json"))


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_encoding_equals_encoding_whole(hf_dir, kind):
    tok = load_tokenizer(str(hf_dir(kind)))
    text = texts()["shakespeare"][:200_000] + texts()["german"] + EMOJI_CJK * 50
    pieces = [text[i: i + 777] for i in range(0, len(text), 777)]
    chunks = list(tok.encode_chunks(pieces, flush_chars=8192))
    assert len(chunks) > 10  # it did cut
    assert [i for c in chunks for i in c] == tok.encode(text)


def test_streamed_encoding_with_llama2_legacy_normalizer_is_still_exact(hf_dir, tmp_path, capfd):
    """Llama 2's older tokenizer.json prepends '▁' in a normalizer and has no pre-tokenizer: no cut
    is safe, so the text is encoded whole, with a warning."""
    config = json.loads((hf_dir("sentencepiece") / "tokenizer.json").read_text(encoding="utf-8"))
    config["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    config["pre_tokenizer"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    text = texts()["german"] * 12  # past 16 x flush_chars
    chunks = list(tok.encode_chunks([text[i: i + 100] for i in range(0, len(text), 100)], flush_chars=256))
    assert [i for c in chunks for i in c] == tok.encode(text)
    assert "no place to cut this text" in capfd.readouterr().err


# ----------------------------------------------------------------------------- prepare, train, export


def test_prepare_train_and_hf_export_with_a_tokenizer_directory(hf_dir, tmp_path):
    """`jaxlm prepare --tokenizer DIR` stores each document's ids + </s>; `jaxlm train
    data.tokenizer=DIR` trains on them; the HF export's tokenizer gives transformers the same ids."""
    from jaxlm.data import shards as R
    from jaxlm.export.cli import export

    directory = hf_dir("sentencepiece")
    tok = load_tokenizer(str(directory))
    docs = tmp_path / "docs.jsonl"
    lines = texts()["shakespeare"][:60_000].split("\n\n")
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    r = run_cli("prepare", str(docs), "--tokenizer", str(directory), "-o", str(tmp_path / "data"),
                "--val-fraction", "0.1", "--workers", "1")
    assert r.returncode == 0, r.stderr
    train = R.open_prepared(str(tmp_path / "data")).split("train")
    stream = np.concatenate([np.asarray(s) for s in train.shards])
    assert stream[: len(tok.encode(lines[0])) + 1].tolist() == tok.encode(lines[0]) + [tok.eot_id]
    vocab = f"model.vocab_size={-(-tok.n_vocab // 64) * 64}"
    run_dir = tmp_path / "run"
    r = run_cli("train", "configs/tiny.yaml", *SMALL, vocab, f"data.tokenizer={directory}",
                f"data.path={tmp_path / 'data'}", "train.steps=3", "train.log_every=1", f"train.run_dir={run_dir}")
    assert r.returncode == 0, r.stderr
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    out = export(run_dir, "hf", tmp_path / "hf")
    exported = transformers.AutoTokenizer.from_pretrained(out)
    for t in texts().values():
        assert exported(t)["input_ids"] == [tok.bos_id] + tok.encode(t)
    assert exported.eos_token == "</s>" and exported.chat_template == CHAT
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_raw_text_training_data_uses_the_tokenizer_eos_between_documents(hf_dir, tmp_path):
    from jaxlm.config import load_config
    from jaxlm.data.sources import load_streams

    directory = hf_dir("byte_level")
    tok = load_tokenizer(str(directory))
    (tmp_path / "a.txt").write_text("First document.", encoding="utf-8")
    (tmp_path / "b.txt").write_text(EMOJI_CJK, encoding="utf-8")
    cfg = load_config("configs/tiny.yaml", [f"data.tokenizer={directory}", f"data.path={tmp_path}",
                                            "data.val_fraction=0"])
    train, _ = load_streams(str(tmp_path), cfg.data, tok)
    want = tok.encode("First document.") + [tok.eot_id] + tok.encode(EMOJI_CJK) + [tok.eot_id]
    assert train.read(0, len(train)).tolist() == want


def test_import_of_a_model_directory_takes_its_tokenizer(hf_dir, tmp_path):
    import jax

    torch = pytest.importorskip("torch")
    from jaxlm.export.importer import import_run

    tok = load_tokenizer(str(hf_dir("sentencepiece")))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.n_vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))
    model.save_pretrained(tmp_path / "hf")
    auto(hf_dir("sentencepiece")).save_pretrained(tmp_path / "hf")
    cfg = import_run(tmp_path / "hf", tmp_path / "run", devices=jax.devices()[:1])
    assert cfg.data.tokenizer == str(tmp_path / "hf") and load_tokenizer(cfg.data.tokenizer).hash == tok.hash


# ----------------------------------------------------------------------------- GGUF



def step0_run(directory: Path, run_dir: Path, tok) -> Path:
    """A run with a random model whose data.tokenizer is `directory` (nothing trained)."""
    import jax

    from jaxlm.config import load_config
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.checkpoint import runs
    from jaxlm.train.step import make_trainer

    cfg = load_config("configs/tiny.yaml", SMALL + [f"model.vocab_size={tok.n_vocab + 5}",
                                                    f"data.tokenizer={directory}", f"train.run_dir={run_dir}"])
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    runs.write_step0(run_dir, cfg, trainer.init_state()["params"], trainer)
    return run_dir


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_tokenizer_gives_llama_cpp_the_same_ids(hf_dir, tmp_path, kind):
    llama = llama_cpp()
    from jaxlm.export.cli import export

    tok = load_tokenizer(str(hf_dir(kind)))
    gguf = export(step0_run(hf_dir(kind), tmp_path / "run", tok), "gguf", tmp_path / "model.gguf")
    llm = llama.Llama(str(gguf), vocab_only=True, verbose=False)
    try:
        for name, t in texts().items():
            t = t[:30_000]
            assert llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) == tok.encode(t), name
        assert llm.tokenize(b"Hi", add_bos=True, special=False)[0] == (tok.bos_id if tok.add_bos else
                                                                       tok.encode("Hi")[0])
        assert llm.token_eos() == tok.eot_id
    finally:
        llm.close()


def test_gguf_refuses_a_sentencepiece_bpe_llama_cpp_would_encode_differently(hf_dir, tmp_path, capsys):
    """A BPE trained by `tokenizers` lacks merges that llama.cpp's SentencePiece merging would make."""
    from jaxlm import cli

    directory = hf_dir("sentencepiece_trained")
    run_dir = step0_run(directory, tmp_path / "run", load_tokenizer(str(directory)))
    assert cli.main(["export", str(run_dir), "--format", "gguf", "-o", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not one of its merges" in err[0] and "export --format hf instead" in err[0], err
    assert not (tmp_path / "m.gguf").exists()
