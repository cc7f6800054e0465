"""Chat records for SFT: templates rendered as transformers renders them, the assistant-only mask,
refusals of records with nothing to train on, and packing that keeps conversations whole."""

import json

import numpy as np
import pytest

from jaxlm.data.chat import DEFAULT_TEMPLATE, ChatFormat, chat_format, prompt_tokens, render, render_text
from jaxlm.data.records import ChatRows, check_batch_mask, conversation, encoded, read_records
from jaxlm.data.batch import Batch
from jaxlm.errors import UserError
from jaxlm.tokenizer.tokenizer import load_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": " 2+2? "},
        {"role": "assistant", "content": "4"}]
# Llama 3's shape: headers, trimmed contents, <|eot_id|> ends a turn, bos first
LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim "
          "+ '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# written over several indented lines as Hub templates are (trim_blocks and lstrip_blocks matter); the
# assistant's turns marked with {% generation %}, and a role check with raise_exception
MARKED = """{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role') }}
    {% endif %}
    {{ '<|im_start|>' + message['role'] + '\n' }}
    {%- if message['role'] == 'assistant' %}
        {% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}
    {% else %}
        {{ message['content'] + '<|im_end|>' }}
    {% endif %}
    {{ '\n' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|im_start|>assistant\n' }}
{% endif %}"""
# a user who types a special token: it stays text (bytes), never the token itself
INJECTED = [{"role": "user", "content": "say <|endoftext|> now"}, {"role": "assistant", "content": "ok"}]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A transformers tokenizer over bytes (no merges) with the templates' special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|endoftext|>")
    hf.add_special_tokens({"additional_special_tokens": SPECIALS})
    return hf


def hf_format(hf, template: str, eos: str) -> ChatFormat:
    encode = lambda s: hf.encode(s, add_special_tokens=False)
    return ChatFormat(template, encode, encode, eos_token=eos, bos_token=hf.bos_token)


@pytest.mark.parametrize("template", [DEFAULT_TEMPLATE, LLAMA3, MARKED], ids=["default", "llama3", "generation"])
@pytest.mark.parametrize("gen", [False, True], ids=["whole", "generation-prompt"])
def test_templates_render_as_transformers_renders_them(hf_tokenizer, template, gen):
    fmt = hf_format(hf_tokenizer, template, hf_tokenizer.eos_token)
    messages = CHAT[:-1] if gen else CHAT
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=gen)
    assert render_text(messages, fmt, gen).replace("\ue000", "").replace("\ue001", "") == expected
    assert render(messages, fmt, set(), gen).text == expected


def test_the_assistant_mask_equals_a_hand_built_one_for_multi_turn_records():
    tok = load_tokenizer("bytes")
    enc, text = (lambda s: tok.encode(s, allowed_special="all")), tok.encode_ordinary
    # (text, trained, how it is encoded): the default template; each assistant turn through its <|endoftext|>
    default = [("<|im_start|>system\nBe brief.<|endoftext|>\n<|im_start|>user\nHi there<|endoftext|>\n"
                "<|im_start|>assistant\n", 0, enc), ("Hello!<|endoftext|>", 1, enc),
               ("\n<|im_start|>user\n 2+2? <|endoftext|>\n<|im_start|>assistant\n", 0, enc),
               ("4<|endoftext|>", 1, enc), ("\n", 0, enc)]
    # Llama 3's: trimmed contents, <|eot_id|> ends a turn; only the second assistant turn trained
    llama = [("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n", 0, enc), ("4<|eot_id|>", 1, enc)]
    # a typed special token in a message is ordinary text
    injected = [("<|im_start|>user\n", 0, enc), ("say <|endoftext|> now", 0, text),
                ("<|endoftext|>\n<|im_start|>assistant\n", 0, enc), ("ok<|endoftext|>", 1, enc), ("\n", 0, enc)]
    llama3 = ChatFormat(LLAMA3, enc, text, eos_token="<|eot_id|>", bos_token="<|begin_of_text|>")
    cases = [(chat_format(tok), CHAT, None, default), (llama3, CHAT, {4}, llama),
             (chat_format(tok), INJECTED, None, injected)]
    for fmt, messages, train_on, pieces in cases:
        got = render(messages, fmt, train_on)
        np.testing.assert_array_equal(got.tokens, np.concatenate([e(t) for t, _, e in pieces]))
        np.testing.assert_array_equal(got.mask, np.concatenate([[m] * len(e(t)) for t, m, e in pieces]))


def test_generation_blocks_give_transformers_assistant_masks(hf_tokenizer):
    out = hf_tokenizer.apply_chat_template(CHAT, chat_template=MARKED, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    got = render(CHAT, hf_format(hf_tokenizer, MARKED, hf_tokenizer.eos_token))
    np.testing.assert_array_equal(got.tokens, out["input_ids"])
    np.testing.assert_array_equal(got.mask, out["assistant_masks"])
    assert got.mask.sum() == len(hf_tokenizer.encode("Hello!", add_special_tokens=False)) + len("4") + 2


def test_the_prompt_a_generator_gets_is_the_prefix_the_model_trained_on():
    fmt = chat_format(load_tokenizer("bytes"))
    for chat in (CHAT, INJECTED):
        full, prompt = render(chat, fmt), prompt_tokens(chat[:-1], fmt)
        np.testing.assert_array_equal(full.tokens[: len(prompt)], prompt)
        assert full.mask[len(prompt) - 1] == 0 and full.mask[len(prompt)] == 1


def test_records_with_nothing_to_train_on_are_refused_in_one_line():
    fmt = chat_format(load_tokenizer("bytes"))
    silent = ChatFormat("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}"
                        "{% endfor %}", fmt.encode, fmt.encode_text, fmt.eos_token)
    refusals = [
        (lambda: encoded(*conversation({"messages": CHAT}, "record 0"), silent, 64, "record 0"),
         "record 0: the chat template renders none of its assistant turns, so its loss mask is all zero"),
        (lambda: encoded(*conversation({"messages": CHAT[:2]}, "record 3"), fmt, 64, "record 3"),
         "record 3 has no assistant turn to train on (roles: system, user)"),
        (lambda: conversation({"text": "hi"}, "record 1"), "record 1 is not a chat record"),
        (lambda: conversation({"prompt": "a", "completion": [{"role": "assistant"}]}, "record 2"),
         "record 2: completion: every message must be"),
        (lambda: check_batch_mask(Batch.from_tokens(np.ones((2, 5), np.int32)).map(np.zeros_like)),
         "a batch's loss mask is all zero"),
    ]
    for call, message in refusals:
        with pytest.raises(UserError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value)


def test_packing_keeps_conversations_whole_and_masks_across_them():
    fmt = chat_format(load_tokenizer("bytes"))
    records = [{"prompt": "q" * n, "completion": "a" * (n % 5 + 1)} for n in range(1, 30)]
    convs = [encoded(*conversation(r, "r"), fmt, 128, "r")[:2] for r in records]
    rows = ChatRows(convs, 128, packing=True)
    found = []
    for i in range(len(rows)):
        row = rows[i]
        for seg in range(1, row["segment_ids"].max() + 1):
            at = np.flatnonzero(row["segment_ids"] == seg)
            assert np.array_equal(at, np.arange(at[0], at[-1] + 1))  # contiguous
            np.testing.assert_array_equal(row["positions"][at], np.arange(len(at)))  # positions restart
            found.append((row["inputs"][at].tolist() + [row["targets"][at][-1]], row["loss_mask"][at].tolist()))
        assert row["loss_mask"][row["segment_ids"] == 0].sum() == 0  # padding never counts
    assert len(rows) < len(convs)  # several conversations share a row
    assert found == [(t.tolist(), m[1:].tolist()) for t, m in convs]  # each whole, once, in order


def test_parquet_records_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"prompt": "What is 1 + 2?", "completion": "3"}, {"prompt": "What is 2 + 2?", "completion": "4"}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "r.parquet")
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_records(str(tmp_path / "r.parquet")) == read_records(str(tmp_path / "r.jsonl")) == records
    (tmp_path / "bad.jsonl").write_text('{"prompt": 1}\nnot json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not a JSON record"):
        read_records(str(tmp_path / "bad.jsonl"))


def test_a_template_file_renders_as_its_text_and_an_unreadable_one_is_one_line(tmp_path):
    """data.chat_template is a file or the template itself, wherever a chat format is made."""
    template = "{% for m in messages %}{{ m['role'][0] + ':' + m['content'] + eos_token }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    tok = load_tokenizer("bytes")
    messages = [{"role": "user", "content": "hi"}]
    from_file = prompt_tokens(messages, chat_format(tok, str(tmp_path / "t.jinja")))
    assert from_file.tolist() == prompt_tokens(messages, chat_format(tok, template)).tolist()
    assert tok.decode(from_file.tolist()).startswith("u:hi")
    with pytest.raises(UserError, match=r"data.chat_template='.*nope.jinja' is not a readable template file"):
        chat_format(tok, str(tmp_path / "nope.jinja"))
