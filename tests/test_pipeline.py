"""The grain pipeline: exact epochs, packing by document, mixtures, resumable state, process slices."""

from collections import Counter

import jax
import numpy as np
import pytest

from jaxlm.config import load_config
from jaxlm.data.batch import Batch
from jaxlm.data.pipeline import BatchIterator, PackedRows, TokenStream, Windows, mixture, row_dataset
from jaxlm.data.prepare import prepare
from jaxlm.data.sources import build_data, load_streams
from jaxlm.tokenizer.tokenizer import byte_tokenizer
from jaxlm.model.kernels import attention_mask

T = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Ten documents of varied length (some longer than a row) prepared into several small shards."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    docs = []
    for i in range(10):
        words = rng.choice(["alpha", "beta", "gamma", "delta", "eps"], size=int(rng.integers(1, 7)))
        docs.append(f"doc{i}: " + " ".join(words))
        (root / f"doc{i:02d}.txt").write_text(docs[-1])
    prepare([str(root)], "bytes", str(root / "prepared"), val_fraction=0.0, shard_tokens=100)
    return root, docs


def encoded(docs):
    tok = byte_tokenizer()
    return [tok.encode_ordinary(d) + [256] for d in docs]


def stream_of(corpus):
    root, _ = corpus
    cfg = load_config(None, [f"data.path={root / 'prepared'}"])
    return load_streams(cfg.data.path, cfg.data, byte_tokenizer())[0]


def test_prepared_stream_is_the_documents_with_eot_between(corpus):
    stream = stream_of(corpus)
    docs = encoded(corpus[1])
    assert len(stream.pieces) > 1  # really read across shard boundaries
    np.testing.assert_array_equal(stream.read(0, len(stream)), np.concatenate(docs))
    np.testing.assert_array_equal(stream.doc_starts, np.cumsum([0] + [len(d) for d in docs[:-1]]))


def test_an_epoch_of_windows_yields_exactly_the_corpus_tokens(corpus):
    stream = stream_of(corpus)
    ds = row_dataset(stream, T, packing=False, seed=3, what="test")
    n = len(Windows(stream, T))
    epoch = [ds[i] for i in range(n)]
    got = Counter(np.concatenate([r["inputs"] for r in epoch]).tolist())
    assert got == Counter(stream.read(0, n * T).tolist())
    assert [r["inputs"].tolist() for r in epoch] != [ds[i + n]["inputs"].tolist() for i in range(n)]  # reshuffled


def test_packing_keeps_each_segment_inside_one_document_and_covers_every_token(corpus):
    stream = stream_of(corpus)
    docs = encoded(corpus[1])
    assert any(len(d) > T + 1 for d in docs)  # some documents must be cut into pieces
    packed = PackedRows(stream, T)
    rows = [packed[i] for i in range(len(packed))]
    pieces_inputs, pieces_targets = [], []
    for row in rows:
        for seg in set(row["segment_ids"].tolist()) - {0}:
            at = row["segment_ids"] == seg
            assert np.all(row["positions"][at] == np.arange(at.sum()))
            inputs, targets, mask = row["inputs"][at], row["targets"][at], row["loss_mask"][at]
            assert np.all(mask[:-1] == 1)  # only a document's last token lacks a target
            np.testing.assert_array_equal(inputs[1:], targets[:-1])
            # the segment's inputs are a contiguous slice of exactly one document; a last target
            # is that document's next token
            piece = (inputs.tolist() + targets[-1:].tolist()) if mask[-1] else inputs.tolist()
            owners = [d for d in docs if any(d[k:k + len(piece)] == piece for k in range(len(d) - len(piece) + 1))]
            assert owners, piece
            assert mask[-1] or any(d[-len(piece):] == piece for d in owners)  # unscored: the document's end
            pieces_inputs += inputs.tolist()
            pieces_targets += targets[mask == 1].tolist()
        assert np.all(row["loss_mask"][row["segment_ids"] == 0] == 0)
    assert Counter(pieces_targets) == Counter(sum((d[1:] for d in docs), []))
    assert Counter(pieces_inputs) == Counter(sum(docs, []))  # every token once, <|endoftext|> included
    assert 0.5 < packed.efficiency() <= 1.0


def test_packed_attention_mask_is_block_diagonal_and_causal(corpus):
    packed = PackedRows(stream_of(corpus), T)
    row = max((packed[i] for i in range(len(packed))), key=lambda r: r["segment_ids"].max())
    seg = row["segment_ids"][None]
    mask = np.asarray(attention_mask(T, True, seg))[0]
    want = np.array([[seg[0, t] == seg[0, s] and s <= t for s in range(T)] for t in range(T)])
    np.testing.assert_array_equal(mask, want)
    assert len(set(seg[0].tolist()) - {0}) >= 2  # the row really holds several documents


def test_mixture_follows_its_weights():
    a = TokenStream([np.full(4000, 1, np.uint16)], np.array([0]))
    b = TokenStream([np.full(4000, 2, np.uint16)], np.array([0]))
    mixed = mixture([row_dataset(a, T, False, 0, "a"), row_dataset(b, T, False, 1, "b")], [3.0, 1.0])
    share = np.mean([mixed[i]["inputs"][0] == 1 for i in range(2000)])
    assert abs(share - 0.75) < 0.02


def test_mixture_proportions_are_the_weights_to_a_thousandth():
    """0.7/0.3 is exactly 7 rows in every 10 (grain's mix made it 233:100); any weights are met to
    1e-3 over whole cycles, and every source's rows come in its own order, none skipped."""
    def shares(weights, n):
        streams = [TokenStream([np.full(4000, k, np.uint16)], np.array([0])) for k in range(len(weights))]
        mixed = mixture([row_dataset(s, T, False, None, "s") for s in streams], weights)
        rows = [mixed[i] for i in range(n)]
        picks = [int(r["inputs"][0]) for r in rows]
        for k in range(len(weights)):  # source k's rows are its windows 0, 1, 2, ... in order
            got = [r["inputs"] for r, p in zip(rows, picks) if p == k]
            want = [row_dataset(streams[k], T, False, None, "s")[j]["inputs"] for j in range(len(got))]
            np.testing.assert_array_equal(got, want)
        return [picks.count(k) for k in range(len(weights))]

    assert shares([0.7, 0.3], 10) == [7, 3] and shares([0.7, 0.3], 1000) == [700, 300]
    for weights in ([1.0, 1.9999], [0.2, 0.3, 0.5], [5.0, 1.0, 1.0]):
        got = shares(weights, 3000)
        for g, w in zip(got, weights):
            assert abs(g / 3000 - w / sum(weights)) <= 1e-3, (weights, got)


def test_restored_iterator_continues_with_identical_batches(corpus):
    ds = row_dataset(stream_of(corpus), T, packing=True, seed=0, what="test")
    it = BatchIterator(ds, 4, 0, 1)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = BatchIterator(ds, 4, 0, 1)
    resumed.set_state(state)
    for want in expected:
        jax.tree.map(np.testing.assert_array_equal, next(resumed), want)


def test_two_processes_read_disjoint_slices_that_cover_the_global_batch(corpus):
    ds = row_dataset(stream_of(corpus), T, packing=False, seed=0, what="test")
    whole = BatchIterator(ds, 8, 0, 1)
    parts = [BatchIterator(ds, 8, p, 2) for p in range(2)]
    for _ in range(3):
        rows = [set(p.local_rows(p.next_index)) for p in parts]
        assert not rows[0] & rows[1] and rows[0] | rows[1] == set(whole.local_rows(whole.next_index))
        np.testing.assert_array_equal(np.concatenate([next(p).inputs for p in parts]), next(whole).inputs)


def as_text(tokens) -> str:
    """Token ids as a string, one character per id (<|endoftext|> included), for substring search."""
    return "".join(map(chr, tokens))


def test_build_data_with_packing_and_a_mixture_of_prepared_and_raw_text(corpus, shakespeare_path):
    """build_data with packing over a 1:3 mixture of a prepared corpus and raw text: each batch of 8
    holds exactly 2 rows of the first source and 6 of the second (grain interleaves by weight,
    deterministically), each row one source's; every segment (its inputs, and its last target if
    it has one) is a contiguous run of one training document, so a segment's last target is its
    document's next token, never the next segment's first input; a document's last token
    (<|endoftext|>) is an input without a target; targets are the inputs shifted by one, positions
    count 0, 1, ... from each segment's start, segments 1..k fill the row in order and the loss
    mask is on exactly where a segment is but for a document's last token (off on padding).
    Evaluation rows come from the raw text's held-out tail (the prepared corpus holds none)."""
    root, docs = corpus
    cfg = load_config("configs/tiny.yaml", [
        f"data.mixture=[{{path: {root / 'prepared'}, weight: 1}}, {{path: {shakespeare_path}, weight: 3}}]",
        "data.packing=true", f"data.seq_len={T}", "train.global_batch=8"])
    batches, evals = build_data(cfg)
    # the raw text is one document (its bytes + <|endoftext|>); with a single document the held-out
    # split is its last val_fraction of tokens
    raw = list(shakespeare_path.read_bytes()) + [256]
    cut = len(raw) - int(len(raw) * cfg.data.val_fraction)
    train_texts = {"prepared": [as_text(d) for d in encoded(docs)], "raw": [as_text(raw[:cut])]}

    def source_of(piece) -> str:
        owners = [name for name, texts in train_texts.items() if any(as_text(piece) in t for t in texts)]
        assert len(owners) == 1, piece
        return owners[0]

    seen_packed_row, seen_document_end = False, False
    for _ in range(4):
        batch = next(batches)
        assert all(getattr(batch, k).shape == (8, T) for k in Batch.field_names(packing=True))
        row_sources = []
        for r in range(8):
            seg = batch.segment_ids[r]
            used = int((seg > 0).sum())
            assert seg[0] == 1 and set(np.diff(seg[:used]).tolist()) <= {0, 1} and not seg[used:].any()
            assert not np.any(batch.loss_mask[r][seg == 0])
            owners = set()
            for s in range(1, seg.max() + 1):
                at = seg == s
                np.testing.assert_array_equal(batch.positions[r][at], np.arange(at.sum()))
                inputs, targets, mask = batch.inputs[r][at], batch.targets[r][at], batch.loss_mask[r][at]
                np.testing.assert_array_equal(targets[:-1], inputs[1:])
                assert np.all(mask[:-1] == 1)
                piece = np.append(inputs, targets[-1]) if mask[-1] else inputs
                owners.add(source_of(piece))
                if not mask[-1]:  # the document ends here
                    name = source_of(piece)
                    assert any(t.endswith(as_text(piece)) for t in train_texts[name])
                    seen_document_end |= bool(inputs[-1] == 256)
            assert len(owners) == 1, owners  # a row is packed from one source
            row_sources.append(owners.pop())
            seen_packed_row |= bool(seg.max() >= 2)
        assert sorted(row_sources) == ["prepared"] * 2 + ["raw"] * 6, row_sources
    assert seen_packed_row and seen_document_end  # the checks above really crossed segment boundaries

    held_out = as_text(raw[cut:])
    assert len(evals) == cfg.train.eval_batches
    for batch in evals:
        assert batch.inputs.shape == (8, T) and batch.segment_ids.shape == (8, T)
        for r in range(8):
            assert set(batch.segment_ids[r].tolist()) <= {0, 1}  # the raw text is one long document
            at = batch.segment_ids[r] == 1
            last = batch.targets[r][at][-1:] if batch.loss_mask[r][at][-1] else batch.targets[r][at][:0]
            assert as_text(np.append(batch.inputs[r][at], last)) in held_out


def test_prepared_data_with_another_tokenizer_is_refused(corpus):
    root, _ = corpus
    from jaxlm.data.sources import prepared_streams
    from jaxlm.tokenizer.tokenizer import load_gpt2_files
    from conftest import SHARED_DATA

    fixtures = SHARED_DATA / "cs336_fixtures"
    if not fixtures.is_dir():
        pytest.skip("shared data not found")
    gpt2 = load_gpt2_files(str(fixtures / "gpt2_vocab.json"), str(fixtures / "gpt2_merges.txt"))
    with pytest.raises(Exception, match="was tokenized with 'bytes'"):
        prepared_streams(str(root / "prepared"), gpt2)
