"""The stages of a batch job (deployments/batch.py): plain callables over pandas batches, one job each.

Each stage takes a batch of rows and returns the same rows, in the same order, with columns added; a row that
cannot be served gets a message in its `error` column and is passed through untouched by later stages, so no
row is ever dropped. Columns starting with `__` are internal and removed by `finish_batch` before writing.

    TokenizeStage    prompt | messages | text  (+ sampling_params)  ->  __ids, __params, error
    GenerateStage    __ids, __params (+ lora)  ->  __completion_ids, __stop, finish_reason  (one LLMEngine per actor)
    DetokenizeStage  __completion_ids  ->  generated_text
    ClassifyStage    __ids  ->  label, probs
    finish_batch     -> prompt_tokens, completion_tokens, drops __*, counts the batch

Why the engine keeps its tokenizer although text is made in DetokenizeStage: stop strings must end a sequence
inside the engine (as when serving: no tokens are generated past them), and that needs text. The engine's
incremental text is still not shipped: the output text is a function of the token ids alone (decode, then cut
at the stop string the engine reported, which the engine's text is by its contract), made on a CPU pool that
scales apart from the engines, while the engine stage passes only ids between processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from itertools import count
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import TypeAdapter, ValidationError

from deployments.schemas import ChatMessage, ResponseFormat
from gemma import torch_thread
from gemma.lora import LoRARequest
from gemma.sampling import SamplingParams

logger = logging.getLogger(__name__)

Task = Literal["generate", "chat", "classify"]
INPUT_COLUMN: dict[str, str] = {"generate": "prompt", "chat": "messages", "classify": "text"}
OUTPUT_COLUMNS: dict[str, tuple[str, ...]] = {
    "generate": ("generated_text", "prompt_tokens", "completion_tokens", "finish_reason", "error"),
    "chat": ("generated_text", "prompt_tokens", "completion_tokens", "finish_reason", "error"),
    "classify": ("label", "probs", "prompt_tokens", "error"),
}
_MESSAGES = TypeAdapter(list[ChatMessage])  # the HTTP API's message rules, so a row is valid where a request is


def plain(value: Any) -> Any:
    """A cell as plain Python: Arrow/pandas hand list and struct cells over as numpy arrays and numpy scalars."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def missing(value: Any) -> bool:
    """An absent cell: a key a JSON row lacks is NaN or None in its pandas column."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def error_message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):  # "temperature: Input should be greater than or equal to 0"
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors())
    return str(exc) or type(exc).__name__


def _column(batch: pd.DataFrame, name: str) -> list[Any]:
    """A column's cells, absent ones as None (a null read back from Arrow may be None, NaN or pd.NA)."""
    return [None if missing(v) else v for v in batch[name]] if name in batch.columns else [None] * len(batch)


def _set(batch: pd.DataFrame, name: str, values: list[Any]) -> None:
    batch[name] = pd.Series(values, index=batch.index, dtype=object)


def _json_cell(value: Any, what: str) -> Any:
    """CSV has no nested values: a JSON string stands for a list or an object there."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} is a string that is not JSON: {exc}") from None
    return plain(value)


def with_response_format(sampling: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams fields, with OpenAI's `response_format` (text, json_object, json_schema) turned into the
    `structured_outputs` it means; ValueError if both are given."""
    if "response_format" not in sampling:
        return sampling
    sampling = dict(sampling)
    fmt = _json_cell(sampling.pop("response_format"), "response_format")
    try:
        spec = ResponseFormat.model_validate(fmt).structured()
    except ValidationError as exc:
        raise ValueError(f"response_format: {error_message(exc)}") from None
    if spec is not None:
        if sampling.get("structured_outputs") is not None:
            raise ValueError("sampling_params: give one of response_format and structured_outputs")
        sampling["structured_outputs"] = spec.model_dump(exclude_defaults=True)
    return sampling


def _ready(tally: Any) -> None:
    """Tell the job's tally that a model is loaded (the job's start-up ends with the first one)."""
    if tally is not None:
        import ray

        ray.get(tally.ready.remote(time.time()))


class TokenizeStage:
    """Rows to prompt ids and validated sampling parameters (CPU; one tokenizer per actor).

    Sampling parameters of a row: `defaults` (the job's), overridden field by field by the row's
    `sampling_params` cell (an object, or a JSON string in CSV); the result must be a valid `SamplingParams`.
    """

    def __init__(self, tokenizer: str, task: Task, defaults: dict[str, Any], tally: Any = None) -> None:
        from gemma.tokenizer import GemmaTokenizer

        self.tokenizer = GemmaTokenizer.from_pretrained(tokenizer)
        self.task, self.defaults, self.tally = task, dict(defaults), tally

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        ids, params, errors = [], [], []
        column = INPUT_COLUMN[self.task]
        for value, overrides in zip(_column(batch, column), _column(batch, "sampling_params")):
            row_ids, row_params, error = None, None, None
            try:
                row_ids = self._encode(column, value)
                row_params = None if self.task == "classify" else self._params(overrides)
            except Exception as exc:  # noqa: BLE001 - a bad row is reported in its `error` column, never fatal
                row_ids, row_params, error = None, None, error_message(exc)
            ids.append(row_ids)
            params.append(row_params)
            errors.append(error)
        _set(batch, "__ids", ids)
        _set(batch, "__params", params)
        _set(batch, "error", errors)
        if self.tally is not None:
            import ray

            ray.get(self.tally.add.remote(rows_in=len(batch)))
        return batch

    def _encode(self, column: str, value: Any) -> list[int]:
        if missing(value):
            raise ValueError(f"row has no {column!r}")
        if column == "messages":
            messages = _MESSAGES.validate_python(_json_cell(value, "messages"))
            if not messages:
                raise ValueError("messages must not be empty")
            dumped = [m.model_dump(exclude_none=True) for m in messages]
            return self.tokenizer.apply_chat_template(dumped, add_generation_prompt=True, tokenize=True)
        if not isinstance(value, str):
            raise TypeError(f"{column} must be a string, got {type(plain(value)).__name__}")
        if column == "text" and not value.strip():
            raise ValueError("text must not be empty")
        return self.tokenizer.encode(value)

    def _params(self, overrides: Any) -> str:
        if missing(overrides):
            overrides = {}
        overrides = _json_cell(overrides, "sampling_params")
        if not isinstance(overrides, dict):
            raise TypeError(f"sampling_params must be an object, got {type(overrides).__name__}")
        # a Parquet struct column has every field of every row: a None there means "not set in this row"
        row = with_response_format({k: v for k, v in overrides.items() if v is not None})
        merged = {**self.defaults, **row}
        try:
            params = SamplingParams.model_validate(merged)
        except ValidationError as exc:
            raise ValueError(f"sampling_params: {error_message(exc)}") from None
        if params.n != 1:
            raise ValueError("sampling_params: n must be 1 in a batch job (repeat the row for more samples)")
        if params.logprobs is not None:
            raise ValueError("sampling_params: logprobs are not written by batch jobs")
        return params.model_dump_json()  # a string: Arrow-friendly whatever fields rows set


class GenerateStage:
    """One `LLMEngine` per actor (a TP group when tp_size > 1). Each call adds the batch's valid rows and steps
    the engine until all finish: continuous batching within the batch, up to `max_num_seqs` at once. A row's `lora`
    cell names a LoRA adapter of the job's `lora_modules`, or is an adapter directory (the job needs enable_lora)."""

    def __init__(self, engine_args: dict[str, Any], tally: Any = None) -> None:
        from deployments.model import ServingEngineConfig, load_engine

        args = ServingEngineConfig.model_validate(engine_args)
        self.adapters = args.lora_requests()
        # the stage steps the engine itself (no stream to serve): in this actor's process, on the thread that steps it
        self.engine = torch_thread.call(load_engine, args)
        self._ids = count()
        _ready(tally)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        errors = _column(batch, "error")
        completion: list[list[int] | None] = [None] * len(batch)
        stops: list[str | None] = [None] * len(batch)
        finish: list[str | None] = [None] * len(batch)
        pending: dict[str, int] = {}
        for i, (ids, params, lora) in enumerate(zip(batch["__ids"], batch["__params"], _column(batch, "lora"))):
            if errors[i] is not None:
                continue
            request_id = f"row-{next(self._ids)}"
            try:  # the engine's own checks: prompt + max_tokens within max_model_len, ids in the vocab, the adapter ...
                self.engine.add_request(request_id, [int(t) for t in ids], SamplingParams.model_validate_json(params),
                                        lora_request=self._adapter(lora))
            except ValueError as exc:
                errors[i] = error_message(exc)
                continue
            pending[request_id] = i
        # on the thread that loaded the model (gemma.torch_thread says why)
        for request_id, out in torch_thread.call(self.engine.run_to_completion, pending).items():
            i, o = pending[request_id], out.outputs[0]
            completion[i], finish[i] = list(o.token_ids), o.finish_reason
            stops[i] = o.stop_reason if isinstance(o.stop_reason, str) else None
        _set(batch, "__completion_ids", completion)
        _set(batch, "__stop", stops)
        _set(batch, "finish_reason", finish)
        _set(batch, "error", errors)
        return batch

    def _adapter(self, cell: Any) -> LoRARequest | None:
        """A `lora` cell: a name of lora_modules, or an adapter directory (the same id in every actor: from its path)."""
        if cell is None or cell == "":
            return None
        if not isinstance(cell, str):
            raise ValueError(f"lora must be an adapter name or directory, got {type(plain(cell)).__name__}")
        if cell in self.adapters:
            return self.adapters[cell]
        if not Path(cell).is_dir():
            raise ValueError(f"lora {cell!r} is neither an adapter of lora_modules ({sorted(self.adapters)}) nor a "
                             "directory")
        digest = int.from_bytes(hashlib.sha256(cell.encode()).digest()[:4], "big") >> 1
        return LoRARequest(cell, len(self.adapters) + 1 + digest, cell)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        try:
            if engine is not None:
                engine.shutdown()
        except Exception:  # best effort at teardown: removing the placement group ends the ranks anyway
            logger.exception("shutting down the engine failed")


class DetokenizeStage:
    """Completion ids to `generated_text`: the row's `skip_special_tokens`, cut at the stop string that ended
    it (kept when `include_stop_str_in_output`). Equal to the engine's text by the engine's contract."""

    def __init__(self, tokenizer: str) -> None:
        from gemma.tokenizer import GemmaTokenizer

        self.tokenizer = GemmaTokenizer.from_pretrained(tokenizer)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        texts = []
        for ids, params, stop in zip(batch["__completion_ids"], batch["__params"], batch["__stop"]):
            if not isinstance(ids, (list, np.ndarray)):  # an error row: nothing was generated
                texts.append(None)
                continue
            p = SamplingParams.model_validate_json(params)
            text = self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=p.skip_special_tokens)
            if isinstance(stop, str) and (at := text.find(stop)) >= 0:
                text = text[: at + len(stop) if p.include_stop_str_in_output else at]
            texts.append(text)
        _set(batch, "generated_text", texts)
        return batch


class ClassifyStage:
    """A `GemmaForSequenceClassification` per actor: rows sorted by length, right-padded forwards of at most
    `max_batch_size` rows (the HTTP classifier's padding), softmax probabilities and the argmax label."""

    def __init__(self, model: str, dtype: str, device: str, max_batch_size: int = 16, tally: Any = None) -> None:
        from gemma.model import GemmaForSequenceClassification
        from gemma.weights import resolve_dtype

        device = "cuda:0" if device == "cuda" else device  # Ray makes the actor's one GPU device 0
        self.model = GemmaForSequenceClassification.from_pretrained(model, dtype=resolve_dtype(dtype, model), device=device).eval()
        config = self.model.config
        self.id2label = {int(k): v for k, v in config.id2label.items()}
        self.pad = config.pad_token_id if config.pad_token_id is not None else 0
        self.max_len, self.max_batch_size = config.max_position_embeddings, max_batch_size
        _ready(tally)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        errors = _column(batch, "error")
        labels: list[str | None] = [None] * len(batch)
        probs: list[list[float] | None] = [None] * len(batch)
        rows = []
        for i, ids in enumerate(batch["__ids"]):
            if errors[i] is not None:
                continue
            if len(ids) > self.max_len:
                errors[i] = f"text has {len(ids)} tokens; the classifier takes at most {self.max_len}"
                continue
            rows.append((i, [int(t) for t in ids]))
        rows.sort(key=lambda r: len(r[1]))  # similar lengths together: less padding
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start : start + self.max_batch_size]
            for (i, _), p in zip(chunk, self._forward([ids for _, ids in chunk])):
                labels[i], probs[i] = self.id2label[int(p.argmax())], p.tolist()
        _set(batch, "label", labels)
        _set(batch, "probs", probs)
        _set(batch, "error", errors)
        return batch

    def _forward(self, batch: list[list[int]]) -> torch.Tensor:
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):  # right padding: the model reads each row at its last non-pad token
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        with torch.inference_mode():
            logits = self.model(input_ids.to(self.model.device), attention_mask=mask.to(self.model.device)).logits
        return torch.softmax(logits.float(), dim=-1).cpu()


def _one_arrow_type(values: list[Any]) -> bool:
    import pyarrow as pa

    try:
        pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return False
    return True


def jsonable(value: Any) -> Any:
    """A cell as JSON would have it: plain Python, absent values (NaN, pd.NA) as None."""
    value = plain(value)
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return None if missing(value) else value


def _length(ids: Any) -> int | None:
    return len(ids) if isinstance(ids, (list, np.ndarray)) else None


def finish_batch(
    batch: pd.DataFrame, task: Task, output_format: str = "jsonl", tally: Any = None, return_token_ids: bool = False
) -> pd.DataFrame:
    """The output rows: every input column plus the task's columns; internal ones dropped; the batch counted.

    For Parquet and CSV every column must have one Arrow type: a column whose rows disagree (an `id` that is a
    number here and a string there) is written as text (JSON for lists and objects), and CSV, which holds no
    nested values, gets every list and object as JSON. JSONL keeps every value as it came."""
    errors = _column(batch, "error")
    ok = [e is None for e in errors]
    # absent cells as None, not NaN: JSON gets null, and a column holds one type in every block
    for column in batch.columns:
        if not str(column).startswith("__") and any(missing(v) for v in batch[column]):
            _set(batch, column, _column(batch, column))
    # prompt_tokens is kept on rows the engine refused too (a prompt too long says by how much)
    _set(batch, "prompt_tokens", [_length(ids) for ids in batch["__ids"]])
    if task != "classify":
        completion = [_length(ids) if good else None for ids, good in zip(batch["__completion_ids"], ok)]
        _set(batch, "completion_tokens", completion)
        if return_token_ids:
            _set(batch, "completion_token_ids", [plain(ids) if good else None
                                                 for ids, good in zip(batch["__completion_ids"], ok)])
    added = list(OUTPUT_COLUMNS[task]) + (["completion_token_ids"] if return_token_ids and task != "classify" else [])
    # input columns first, in their order (a column named like an output one is replaced), then the outputs
    batch = batch[[c for c in batch.columns if not str(c).startswith("__") and c not in added] + added]
    if output_format != "jsonl":
        for column in batch.columns:
            values = [plain(v) for v in batch[column]]
            nested = output_format == "csv" and any(isinstance(v, (list, dict)) for v in values)
            if nested or not _one_arrow_type(values):
                _set(batch, column, [v if v is None or isinstance(v, str) else json.dumps(v) for v in values])
    if tally is not None:
        import ray

        prompt = sum(n for n, good in zip(batch["prompt_tokens"], ok) if good and n is not None)
        output = sum(n for n in batch["completion_tokens"] if n is not None) if task != "classify" else 0
        ray.get(tally.add.remote(rows=len(batch), errors=ok.count(False), prompt_tokens=prompt, completion_tokens=output))
    return batch
