"""jaxlm as an lm-evaluation-harness model: parity with lm-eval's own `hf` backend on the HF
export, stop sequences, int8, masked diffusion's ELBO, and one-line errors for bad tasks.

One tiny random model (D=64, byte tokenizer, f32, norm scales randomised as in test_export) on its
run's mesh (mesh.tensor=2: 4 x 2 data x tensor on the 8 test devices), its HF export, and task
files from `jaxlm tasks` (next_line from TinyShakespeare, arithmetic), made once for the module.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.evaluator import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from jaxlm import cli  # noqa: E402
from jaxlm.checkpoint import runs  # noqa: E402
from jaxlm.config import MeshConfig, load_config  # noqa: E402
from jaxlm.eval.harness import JaxlmLM  # noqa: E402
from jaxlm.parallel.mesh import make_mesh  # noqa: E402
from jaxlm.train.step import make_trainer  # noqa: E402

BASE = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128", "model.n_layers=2",
        "model.max_seq_len=160", "data.seq_len=32", "train.global_batch=8", "train.eval_every=0",
        "train.progress=false", "train.peak_flops_per_device=1e12", "checkpoint.async_save=false"]
MDLM = ["train.objective=mdlm", "model.causal=false", "model.vocab_size=258"]
N_DOCS = 12  # next_line documents (4 choices each) per backend
STOP_PROMPTS = ["ROMEO:\nWhat light", "First Citizen:\nBefore we", "To be"]


def write_run(run_dir: Path, *overrides: str) -> Path:
    cfg = load_config(None, BASE + list(overrides) + [f"train.run_dir={run_dir}"])
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:2]))
    keys = iter(jax.random.split(jax.random.key(7), 64))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * jax.random.uniform(next(keys), x.shape, x.dtype, 0.5, 1.5)
        if "scale" in jax.tree_util.keystr(p) else x, trainer.init_state()["params"])
    runs.write_step0(run_dir, cfg, params, trainer)
    return run_dir


@pytest.fixture(scope="module")
def made(tmp_path_factory, shakespeare_path):
    """{"run", "hf", "tasks"}: the run directory, its HF export and the task directory."""
    from jaxlm.export.cli import export

    root = tmp_path_factory.mktemp("lmeval")
    run_dir = write_run(root / "run", "mesh.tensor=2")
    export(run_dir, "hf", root / "hf")
    assert cli.main(["tasks", str(root / "tasks"), "--text", str(shakespeare_path), "--n", "40"]) == 0
    return {"run": run_dir, "hf": root / "hf", "tasks": root / "tasks"}


@functools.cache
def jaxlm_lm(run_dir: Path, quantize: str | None = None) -> JaxlmLM:
    return JaxlmLM(runs.load_run(str(run_dir)), batch_size=8, quantize=quantize)  # as `jaxlm eval --batch-size 8`


@functools.cache
def hf_lm(hf_dir: Path):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=8)


def evaluate(lm, tasks_dir: Path, task: str, limit: int) -> dict:
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=True,
                           bootstrap_iters=0)


def answers(results: dict, task: str) -> list:
    """Per document, in document order: the model's raw answers to its requests."""
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


# ----------------------------------------------------------------------------- parity with lm-eval's hf


def test_multiple_choice_loglikelihoods_equal_lm_evals_hf_backend_on_the_export(made):
    ours = evaluate(jaxlm_lm(made["run"]), made["tasks"], "next_line", N_DOCS)
    theirs = evaluate(hf_lm(made["hf"]), made["tasks"], "next_line", N_DOCS)
    got, want = answers(ours, "next_line"), answers(theirs, "next_line")
    assert len(got) == N_DOCS and all(len(doc) == 4 for doc in got)
    got_ll = np.array([[choice[0][0] for choice in doc] for doc in got])
    want_ll = np.array([[choice[0][0] for choice in doc] for doc in want])
    np.testing.assert_allclose(got_ll, want_ll, atol=1e-4, rtol=0)
    assert [[c[0][1] for c in doc] for doc in got] == [[c[0][1] for c in doc] for doc in want]  # is_greedy
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["next_line"][metric] == theirs["results"]["next_line"][metric]
    assert ours["config"]["jaxlm"]["loglikelihood"].startswith("exact")
    assert ours["config"]["jaxlm"]["mesh"] == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2}


def test_jaxlm_eval_tasks_writes_lm_evals_result_json(made, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert cli.main(["eval", str(made["run"]), "--tasks", "next_line", "--include-path", str(made["tasks"]),
                     "--limit", "3", "--num-fewshot", "1", "--batch-size", "8", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["n-shot"] == {"next_line": 1} and results["n-samples"]["next_line"]["effective"] == 3
    assert 0 <= results["results"]["next_line"]["acc,none"] <= 1 and "samples" not in results
    assert results["config"]["jaxlm"]["step"] == 0 and results["config"]["jaxlm"]["batch_rows"] == 8
    assert "next_line" in capsys.readouterr().err  # lm-eval's table
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_rolling_loglikelihood_over_several_windows_equals_hf(made, shakespeare_path):
    """Texts longer than max_seq_len=160 tokens: lm-eval's disjoint windows, summed per text (700
    tokens' log-probabilities summed in f32 by both: equal to a few units in the 7th digit)."""
    text = shakespeare_path.read_text()
    docs = [text[:700], text[5000:5100], "x"]
    requests = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    got = jaxlm_lm(made["run"]).loglikelihood_rolling(requests)
    want = hf_lm(made["hf"]).loglikelihood_rolling(requests, disable_tqdm=True)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-6)


def test_generate_until_matches_hf_greedy_and_stops_at_the_task_stop_sequences(made):
    ours = evaluate(jaxlm_lm(made["run"]), made["tasks"], "integer_arithmetic", 6)
    theirs = evaluate(hf_lm(made["hf"]), made["tasks"], "integer_arithmetic", 6)
    assert answers(ours, "integer_arithmetic") == answers(theirs, "integer_arithmetic")
    # stop strings taken from the middle of each unconstrained greedy continuation must cut it there
    prompts = STOP_PROMPTS
    free = [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 24}), i) for i, p in enumerate(prompts)]
    texts = hf_lm(made["hf"]).generate_until(free, disable_tqdm=True)
    assert jaxlm_lm(made["run"]).generate_until(free) == texts
    stops = [t[8:10] for t in texts]
    cut = [Instance("generate_until", {}, (p, {"until": [s], "max_gen_toks": 24}), i)
           for i, (p, s) in enumerate(zip(prompts, stops))]
    got = jaxlm_lm(made["run"]).generate_until(cut)
    assert got == [t[: t.index(s)] for t, s in zip(texts, stops)]
    assert got == hf_lm(made["hf"]).generate_until(cut, disable_tqdm=True)


def test_decoding_ends_as_soon_as_a_rows_text_holds_its_stop_string(made):
    from jaxlm.inference.decode import generate
    from jaxlm.inference.sampling import Sampling

    lm = jaxlm_lm(made["run"])
    prompts = [lm.tok_encode(p) for p in STOP_PROMPTS] + [[lm.eot_token_id]] * 5  # the shapes generate_until ran
    free = generate(lm.decoder(), prompts, 24, Sampling(0.0))
    stops = [lm.tok_decode(row[3:5]) for row in free]
    held = generate(lm.decoder(), prompts, 24, Sampling(0.0), until=lambda row, toks: stops[row] in lm.tok_decode(toks))
    for row, stop, got in zip(free, stops, held):
        first = min(k for k in range(1, 25) if stop in lm.tok_decode(row[:k]))  # by hand: where it appears
        assert got == row[:first] and first <= 5


def test_int8_weights_are_what_the_scores_use(made):
    """The int8 model's log-likelihoods move a little from f32's (so they are computed with it)."""
    doc = [Instance("loglikelihood", {}, ("ROMEO:\nWhat light through", " yonder window breaks"), 0)]
    f32 = jaxlm_lm(made["run"]).loglikelihood(doc, disable_tqdm=True)[0][0]
    int8_lm = jaxlm_lm(made["run"], "int8")
    int8 = int8_lm.loglikelihood(doc, disable_tqdm=True)[0][0]
    assert any(hasattr(leaf, "project") for leaf in jax.tree.leaves(
        int8_lm.scorer.params, is_leaf=lambda x: hasattr(x, "project")))
    assert int8 != f32 and abs(int8 - f32) < 0.05 * abs(f32)
    assert int8_lm.get_model_info()["jaxlm"]["quantize"] == "int8"


# ----------------------------------------------------------------------------- masked diffusion


@pytest.fixture(scope="module")
def mdlm_lm() -> JaxlmLM:
    """A random masked diffusion model, held in memory (no checkpoint needed), 64 samples per request."""
    from flax import nnx

    from jaxlm.model.build import build_model
    from jaxlm.tokenizer.tokenizer import Tokenizer, load_tokenizer

    cfg = load_config(None, BASE + MDLM)
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, 0)))
    run = runs.Run(cfg, params, Tokenizer.from_encoding(load_tokenizer("bytes")), 0, Path("mdlm/checkpoints/0"),
                   make_mesh(MeshConfig(data=2), jax.devices()[:2]))
    return JaxlmLM(run, batch_size=4, elbo_samples=64)


def test_mdlm_elbo_is_the_bound_computed_by_hand_in_any_batch(mdlm_lm):
    """One token: exactly log p(c | x, c masked). Two tokens: -[(a + b)/2 + c/2], a (b) the first
    (second) token's cross-entropy with it alone masked, c both's with both masked; 64 samples put
    half on one masked token (a random one of the two) and half on both. The same request scores
    the same beside longer ones (other padding, other batch)."""
    from jaxlm.objectives.mdlm import mask_id, subs_logits

    lm = mdlm_lm
    model, m = lm.run.model(), mask_id(lm.run.cfg.model.vocab_size)
    context, cont = lm.tok_encode("ROMEO: What light thr"), lm.tok_encode("ou")

    def ce(tokens: list[int], masked: list[int]) -> float:
        x = np.array([context + [m if i in masked else t for i, t in enumerate(tokens)]])
        logp = jax.nn.log_softmax(subs_logits(model(x)[0], m), axis=-1)[0, len(context):]
        return -float(sum(logp[i, tokens[i]] for i in masked))

    one, two = lm.scorer.score([(context, cont[:1]), (context, cont)])
    assert one[0] == pytest.approx(-ce(cont[:1], [0]), abs=1e-4)
    a, b, c = ce(cont, [0]), ce(cont, [1]), ce(cont, [0, 1])
    assert two[0] == pytest.approx(-((a + b) / 2 + c / 2), abs=0.35 * abs(a - b) + 1e-4)  # 4 sd of the choice
    # bidirectional attention: padding is a segment of its own, and each row draws its own noise
    others = [(lm.tok_encode("x" * n), lm.tok_encode(" yz")) for n in (40, 90, 7)]
    assert lm.scorer.score(others + [(context, cont)])[-1][0] == pytest.approx(two[0], abs=1e-5)


def test_mdlm_results_say_the_likelihood_is_the_elbo_and_generation_is_refused(mdlm_lm):
    info = mdlm_lm.get_model_info()["jaxlm"]  # simple_evaluate puts it in the JSON's "config"
    assert info["loglikelihood"].startswith("a lower bound: the MDLM ELBO") and info["elbo_samples"] == 64
    from jaxlm.errors import UserError

    with pytest.raises(UserError, match="^generate_until tasks need an autoregressive run; mdlm is a "
                                        "train.objective=mdlm run"):
        mdlm_lm.generate_until([Instance("generate_until", {}, ("x", {"until": ["\n"]}), 0)])


# ----------------------------------------------------------------------------- one-line errors


def broken_tasks(root: Path, made) -> dict[str, Path]:
    """Task directories, each with one thing wrong."""
    good = (made["tasks"] / "next_line" / "next_line.yaml").read_text()
    cases = {"syntax": "task: next_line_copy\ndoc_to_text: [unclosed\n",
             "missing_data": good.replace("task: next_line", "task: nl_missing").replace(
                 str(made["tasks"] / "next_line" / "validation.jsonl"), str(root / "nowhere.jsonl")),
             "bad_output_type": good.replace("task: next_line", "task: nl_bad").replace(
                 "output_type: multiple_choice", "output_type: multiple_choise")}
    dirs = {}
    for name, text in cases.items():
        (root / name).mkdir()
        (root / name / f"{name}.yaml").write_text(text)
        dirs[name] = root / name
    return dirs


def test_bad_task_names_and_task_files_are_one_line_errors(made, tmp_path, capsys):
    dirs = broken_tasks(tmp_path, made)
    tasks = str(made["tasks"])
    cases = [
        (["--tasks", "next_lin", "--include-path", tasks], "--tasks next_lin: no such task among lm-eval's or in "
                                                          f"--include-path {tasks}; did you mean next_line"),
        (["--tasks", "next_line_copy", "--include-path", str(dirs["syntax"])],
         f"{dirs['syntax'] / 'syntax.yaml'}: not an lm-eval task file (while parsing"),
        (["--tasks", "nl_missing", "--include-path", str(dirs["missing_data"])],
         f"task nl_missing ({dirs['missing_data'] / 'missing_data.yaml'}) could not be loaded: FileNotFoundError"),
        (["--tasks", "nl_bad", "--include-path", str(dirs["bad_output_type"])],
         f"task nl_bad ({dirs['bad_output_type'] / 'bad_output_type.yaml'}) could not be loaded:"),
        (["--tasks", "next_line", "--include-path", str(tmp_path / "none")], "no such directory"),
        (["--tasks", "next_line", "--include-path", tasks, "--split", "val"], "--split: only used with --data"),
        (["--tasks", "next_line", "--include-path", tasks, "--limit", "-1"], "--limit -1 must be >= 0"),
        (["--data", "x.txt", "--limit", "3"], "--limit: only used with --tasks, not with --data"),
    ]
    for argv, words in cases:
        assert cli.main(["eval", str(made["run"]), *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and err[0].startswith("jaxlm eval: error:"), (argv, err)


# ----------------------------------------------------------------------------- docs/eval.md's task files

HELLASWAG = {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow "
             "covering the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then",
             "ctx": "unused", "split": "val", "split_type": "indomain", "source_id": "activitynet~v_-1IBHYS3L-Y",
             "label": 3, "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski "
                                     "lift, while two men supporting the head of the person wearing winter clothes "
                                     "snow as the we girls sled.", ", the man puts on a christmas coat, knitted with "
                                     "netting.", ", the man continues removing the snow on his car."]}
GSM8K = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
         "May. How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
         "altogether in April and May.\n#### 72"}


def test_the_hellaswag_and_gsm8k_task_files_of_the_docs_read_the_original_files(tmp_path):
    """docs/eval.md's YAMLs, pointed at records in the original files' schema: lm-eval's HellaSwag
    preprocessing and GSM8K's answer matching apply."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "eval.md").read_text()
    for block in re.findall(r"^```yaml\n(.*?)^```", text, flags=re.M | re.S):
        for path in re.findall(r"/data/\S+\.jsonl", block):
            record = HELLASWAG if "hellaswag" in path else GSM8K
            (tmp_path / Path(path).name).write_text(json.dumps(record) + "\n")
            block = block.replace(path, str(tmp_path / Path(path).name))
        name = re.search(r"^task: (\S+)", block, flags=re.M).group(1)
        (tmp_path / f"{name}.yaml").write_text(block)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    hellaswag = manager.load(["hellaswag_local"])["tasks"]["hellaswag_local"]
    doc = hellaswag.validation_docs()[0]
    assert hellaswag.doc_to_text(doc) == ("Removing ice from car: Then, the man writes over the snow covering the "
                                          "window of a car, and a woman wearing winter clothes smiles. Then")
    assert hellaswag.doc_to_choice(doc)[3] == ", the man continues removing the snow on his car."
    assert int(hellaswag.doc_to_target(doc)) == 3
    gsm8k = manager.load(["gsm8k_local"])["tasks"]["gsm8k_local"]
    doc = gsm8k.test_docs()[0]
    assert gsm8k.doc_to_text(doc) == f"Question: {GSM8K['question']}\nAnswer:"
    assert gsm8k.process_results(doc, ["She sold 24 in May, so 48 + 24 = 72.\n#### 72"])["exact_match"] == 1.0
    assert gsm8k.process_results(doc, ["#### 71"])["exact_match"] == 0.0
