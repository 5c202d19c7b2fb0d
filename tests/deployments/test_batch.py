"""Batch jobs on Ray Data (deployments/batch.py) on the session's Ray cluster, against the library run directly.

Four jobs, each shared by the tests that read it (a job costs ~10-20 s of actor start-up, the model work is ~1 s):
generate JSONL -> JSONL (100 rows + bad rows + per-row overrides), chat Parquet -> Parquet on TP=2 engines,
classify CSV -> CSV, and the command line into a directory.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deployments.batch import BatchArgs, check_resources, main, run_batch
from gemma import LLM, GemmaForSequenceClassification, GemmaTokenizer, SamplingParams

MAX_TOKENS = 8
ENGINE = {"dtype": "float32", "kv_cache_memory": "8MiB", "max_model_len": 64, "max_num_seqs": 16, "batch_size": 40,
          "return_token_ids": True, "sampling_params": {"max_tokens": MAX_TOKENS, "temperature": 0}}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "gemma", "model", "token", "text", "best",
         "times", "age", "wisdom"]
PROMPTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 9)) for i in range(100)]
LONG = " ".join(WORDS * 6)  # more tokens than max_model_len


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def llm(tiny_lm_dir):
    with LLM(str(tiny_lm_dir), max_model_len=64, kv_cache_memory="8MiB") as llm:
        yield llm


def greedy(max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


# ---- generate: JSONL in and out --------------------------------------------------------------------------

BAD_ROWS = [
    ({"id": "no-prompt"}, "no 'prompt'"),
    ({"id": "wrong-type", "prompt": 42}, "prompt must be a string"),
    ({"id": "too-long", "prompt": LONG}, "max_model_len"),
    ({"id": "negative-temperature", "prompt": "hi", "sampling_params": {"temperature": -1}}, "temperature"),
    ({"id": "string-temperature", "prompt": "hi", "sampling_params": {"temperature": "hot"}}, "temperature"),
    ({"id": "unknown-field", "prompt": "hi", "sampling_params": {"temprature": 0.5}}, "temprature"),
    ({"id": "n", "prompt": "hi", "sampling_params": {"n": 2}}, "n must be 1"),
    ({"id": "params-not-object", "prompt": "hi", "sampling_params": [1, 2]}, "must be an object"),
    ({"id": "bad-schema", "prompt": "hi", "sampling_params": {"structured_outputs": {"json": '{"type": "nope"}'}}},
     "structured_outputs.json"),
]
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def generate_job(ray_cluster, tiny_lm_dir, llm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch-generate")
    # a stop string taken from the middle of a greedy output, so the engine stops on it
    stop_text = llm.generate(PROMPTS[5], greedy(), use_tqdm=False)[0].text
    stop = stop_text[len(stop_text) // 2:][:2]
    rows = [{"id": i, "prompt": p, "extra": f"x{i}"} for i, p in enumerate(PROMPTS)]
    rows.insert(30, {"id": "short", "prompt": PROMPTS[3], "sampling_params": {"max_tokens": 3}})
    rows.insert(60, {"id": "stop", "prompt": PROMPTS[5], "sampling_params": {"stop": [stop]}})
    # a schema as JSON text (a struct column would give each row every other row's keys), or OpenAI's response_format
    rows.insert(70, {"id": "json", "prompt": PROMPTS[6], "sampling_params": {
        "max_tokens": 30, "structured_outputs": {"json": json.dumps(SCHEMA)}}})
    rows.insert(80, {"id": "response-format", "prompt": PROMPTS[7], "sampling_params": {
        "max_tokens": 30, "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}}})
    for k, (row, _) in enumerate(BAD_ROWS):
        rows.insert(10 * k + 5, row)
    source = write_jsonl(tmp / "in.jsonl", rows)
    summary = run_batch(BatchArgs(model=str(tiny_lm_dir), input=str(source), output=str(tmp / "out.jsonl"), **ENGINE))
    return rows, read_jsonl(tmp / "out.jsonl"), summary, stop


def test_generate_matches_llm_generate_token_for_token(generate_job, llm):
    _rows, out, summary, _ = generate_job
    by_id = {r["id"]: r for r in out}
    expected = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    for i, ref in enumerate(expected):
        row = by_id[i]
        assert row["error"] is None, row
        assert row["completion_token_ids"] == ref.token_ids, i
        assert row["generated_text"] == ref.text
        assert row["finish_reason"] == ref.outputs[0].finish_reason
        assert row["prompt_tokens"] == len(ref.prompt_token_ids)
        assert row["completion_tokens"] == len(ref.token_ids)
        assert row["extra"] == f"x{i}" and row["prompt"] == PROMPTS[i]  # input columns are kept
    good = [by_id[i] for i in range(100)] + [by_id[k] for k in ("short", "stop", "json", "response-format")]
    assert summary.prompt_tokens == sum(r["prompt_tokens"] for r in good)
    assert summary.completion_tokens == sum(r["completion_tokens"] for r in good)
    assert summary.tokens_per_s > 0 and summary.elapsed_s > 0


def test_per_row_overrides_and_stop_strings_match_the_engine(generate_job, llm):
    _, out, _, stop = generate_job
    by_id = {r["id"]: r for r in out}
    short = llm.generate(PROMPTS[3], greedy(3), use_tqdm=False)[0]
    assert by_id["short"]["completion_token_ids"] == short.token_ids and by_id["short"]["completion_tokens"] == 3
    stopped = llm.generate(PROMPTS[5], greedy(stop=[stop]), use_tqdm=False)[0]
    assert stopped.outputs[0].stop_reason == stop
    assert by_id["stop"]["finish_reason"] == "stop"
    assert by_id["stop"]["completion_token_ids"] == stopped.token_ids
    assert by_id["stop"]["generated_text"] == stopped.text  # cut at the stop string, as the engine's text is
    for key, prompt in (("json", PROMPTS[6]), ("response-format", PROMPTS[7])):
        constrained = llm.generate(prompt, greedy(30, structured_outputs={"json": SCHEMA}), use_tqdm=False)[0]
        assert by_id[key]["completion_token_ids"] == constrained.token_ids
        assert 0 <= json.loads(by_id[key]["generated_text"])["n"] <= 99 and by_id[key]["finish_reason"] == "stop"


def test_bad_rows_get_an_error_and_nothing_is_lost(generate_job):
    rows, out, summary, _ = generate_job
    assert len(out) == len(rows) == summary.rows == summary.rows_in
    assert [r["id"] for r in out] == [r["id"] for r in rows]  # input order
    by_id = {r["id"]: r for r in out}
    for row, message in BAD_ROWS:
        got = by_id[row["id"]]
        assert got["error"] and message in got["error"], got
        assert got["generated_text"] is None and got["completion_tokens"] is None
    assert by_id["too-long"]["prompt_tokens"] > 64  # it says how long it was
    assert by_id["wrong-type"]["prompt"] == 42  # kept as given
    assert summary.errors == len(BAD_ROWS)
    assert sum(r["error"] is not None for r in out) == len(BAD_ROWS)


# ---- chat: Parquet in and out, on engines of two tensor-parallel ranks ----------------------------------------

CHATS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}],
    [{"role": "user", "content": "gemma"}, {"role": "assistant", "content": "model"}, {"role": "user", "content": "dog"}],
]


@pytest.mark.slow  # two TP=2 engines on Ray (~25 s): CI runs it, `make test` leaves it out
def test_chat_parquet_on_tp2_engines_matches_llm_on_templated_ids(ray_cluster, tiny_lm_dir, llm, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.util import placement_group_table

    # a struct column has every field in every row: None means "not set here" (row 0 alone overrides max_tokens,
    # row 2 alone is constrained: rank 0 samples under the grammar)
    regex = {"regex": "[a-z]{2,5}( [a-z]{1,3})?"}
    rows = [{"id": i, "messages": m, "sampling_params": {"max_tokens": 4 if i == 0 else None, "top_k": None,
                                                          "structured_outputs": regex if i == 2 else None}}
            for i, m in enumerate(CHATS)]
    rows += [{"id": 10, "messages": []}, {"id": 11, "messages": [{"role": "robot", "content": "beep"}]},
             {"id": 12, "messages": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    groups_before = set(placement_group_table())
    summary = run_batch(BatchArgs(model=str(tiny_lm_dir), input=str(tmp_path / "in.parquet"),
                                  output=str(tmp_path / "out.parquet"), task="chat", tp_size=2, **ENGINE))
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in out] == [r["id"] for r in rows] and summary.rows == len(rows) and summary.errors == 3

    tok = GemmaTokenizer.from_pretrained(tiny_lm_dir)
    expected = llm.generate([tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m in CHATS],
                            [greedy(4), greedy(), greedy(structured_outputs=regex)], use_tqdm=False)
    for row, ref in zip(out, expected):
        assert row["error"] is None and row["messages"] == CHATS[row["id"]]
        assert row["completion_token_ids"] == ref.token_ids and row["generated_text"] == ref.text
    assert "messages" in out[3]["error"] and "role" in out[4]["error"] and "no 'messages'" in out[5]["error"]

    # each engine actor ran in a placement group of its own with one bundle per rank, removed when the job ended
    table = placement_group_table()
    ours = [table[g] for g in set(table) - groups_before if len(table[g]["bundles"]) == 2]
    assert ours and all(g["strategy"] == "STRICT_PACK" and g["state"] == "REMOVED" for g in ours)


def test_csv_cells_hold_messages_and_overrides_as_json(tiny_lm_dir):
    """CSV has no nested values: a JSON string stands for a list or an object (the stage alone, no Ray)."""
    import pandas as pd

    from deployments.batch_stages import TokenizeStage

    tok = GemmaTokenizer.from_pretrained(tiny_lm_dir)
    stage = TokenizeStage(str(tiny_lm_dir), "chat", {"max_tokens": 8})
    batch = pd.DataFrame({"messages": [json.dumps(CHATS[1]), "[not json", json.dumps(CHATS[0])],
                          "sampling_params": ['{"temperature": 0.5}', None, '"hot"']})
    out = stage(batch)
    assert list(out["__ids"][0]) == tok.apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=True)
    assert SamplingParams.model_validate_json(out["__params"][0]) == SamplingParams(max_tokens=8, temperature=0.5)
    assert out["error"][0] is None and "not JSON" in out["error"][1] and "must be an object" in out["error"][2]


# ---- classify: CSV in and out ----------------------------------------------------------------------------------

def test_classify_csv_matches_the_classifier_run_directly(ray_cluster, tiny_classifier_dir, tmp_path):
    texts = ["great", "awful movie", "it was fine I guess", "the quick brown fox jumps over the lazy dog"]
    with open(tmp_path / "in.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([[i, t] for i, t in enumerate(texts)] + [[10, ""], [11, "   "]])
    summary = run_batch(BatchArgs(model=str(tiny_classifier_dir), input=str(tmp_path / "in.csv"),
                                  output=str(tmp_path / "out.csv"), task="classify", dtype="float32", batch_size=4))
    with open(tmp_path / "out.csv", newline="") as f:
        out = list(csv.DictReader(f))
    assert [int(r["id"]) for r in out] == [0, 1, 2, 3, 10, 11] and summary.rows == 6 and summary.errors == 2
    assert out[4]["error"] and out[5]["error"]

    tok = GemmaTokenizer.from_pretrained(tiny_classifier_dir)
    model = GemmaForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    for row, text in zip(out, texts):
        with torch.inference_mode():
            probs = torch.softmax(model(torch.tensor([tok.encode(text)])).logits[0], -1)
        assert row["label"] == id2label[int(probs.argmax())] and not row["error"]
        assert json.loads(row["probs"]) == pytest.approx(probs.tolist(), abs=1e-5)  # CSV holds the list as JSON


# ---- the command line -------------------------------------------------------------------------------------------

def test_command_line_writes_a_directory(ray_cluster, tiny_lm_dir, llm, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS[:5]])
    code = main(["--model", str(tiny_lm_dir), "--input", str(source), "--output", str(tmp_path / "out"),
                 "--dtype", "float32", "--kv-cache-memory", "8MiB", "--max-model-len", "64", "--concurrency", "1,2",
                 "--max-tokens", "4", "--temperature", "0"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == 5 and printed["errors"] == 0 and printed["completion_tokens"] == 20
    out = [r for f in sorted((tmp_path / "out").iterdir()) for r in read_jsonl(f)]
    expected = llm.generate(PROMPTS[:5], greedy(4), use_tqdm=False)
    assert [r["generated_text"] for r in out] == [e.text for e in expected]


def test_arguments_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match="concurrency"):
        BatchArgs(input="a.jsonl", output="b.jsonl", concurrency=(3, 1))
    with pytest.raises(ValueError, match="temperature"):
        BatchArgs(input="a.jsonl", output="b.jsonl", sampling_params={"temperature": -1})
    with pytest.raises(ValueError, match="input_format"):
        BatchArgs(input="data/prompts", output="b.jsonl")
    assert BatchArgs(input="data/prompts", input_format="csv", output="out").input_format == "csv"
    with pytest.raises(ValueError, match="structured_outputs.regex"):  # a job default that cannot compile
        BatchArgs(input="a.jsonl", output="b.jsonl", sampling_params={"structured_outputs": {"regex": "("}})


def test_command_line_structured_output_flags(tmp_path):
    from deployments.batch import parse_args

    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    base = ["--model", "m", "--input", "in.jsonl", "--output", "out.jsonl"]
    args = parse_args([*base, "--json-schema", str(tmp_path / "schema.json")])
    assert args.sampling_params == {"structured_outputs": {"json": SCHEMA}}
    args = parse_args([*base, "--response-format", "json_object"])
    assert args.sampling_params == {"structured_outputs": {"json_object": True}}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}
    assert parse_args([*base, "--response-format", json.dumps(fmt)]).sampling_params == {
        "structured_outputs": {"json": SCHEMA}}


def test_a_job_the_cluster_can_never_run_is_refused_at_once_naming_what_is_missing(tiny_lm_dir):
    two_cpus = BatchArgs(input="in.jsonl", output="out.jsonl", model=str(tiny_lm_dir))
    check_resources(two_cpus, {"CPU": 2.0})  # an engine of 1 CPU and the light stages fit a 2-core machine
    with pytest.raises(ValueError, match=r"needs 1.75 CPU \(engines 1, .*\) but the Ray cluster has 1"):
        check_resources(two_cpus, {"CPU": 1.0})
    with pytest.raises(ValueError, match="needs 2 GPU .* has 0"):
        check_resources(two_cpus.model_copy(update={"device": "cuda", "concurrency": 2}), {"CPU": 8.0})
    with pytest.raises(ValueError, match=r"needs 4.75 CPU \(engines 4, "):
        check_resources(two_cpus.model_copy(update={"tp_size": 2, "num_cpus": 2.0}), {"CPU": 4.0})


@pytest.mark.slow
def test_the_command_line_runs_on_a_ray_the_size_of_a_2_core_machine(tiny_lm_dir, tmp_path):
    """`python -m deployments.batch` as a user runs it, on a fresh local Ray of 2 CPUs (the test cluster has more,
    which hid a job that waited forever for a CPU its own actors held): it finishes, every row written."""
    rows = [{"prompt": f"row {i}"} for i in range(5)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = (
        "import sys, ray; ray.init(address='local', num_cpus=2, include_dashboard=False); "
        "from deployments.batch import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = ["--model", str(tiny_lm_dir), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
            "--max-tokens", "3", "--dtype", "float32"]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in out] == [r["prompt"] for r in rows]
    assert all(r["error"] is None and r["completion_tokens"] == 3 for r in out)

