"""What each RL framework's reward client sends and reads back: the request bodies `rmtrain serve` accepts and the
answers it gives, a parse and an answer function per route (no HTTP here). Every text is scored as `rmtrain score`
scores `{"text": ...}` (or, for /score, `{"prompt", "completion"}`), through rmtrain.groups.scoring_ids.

- `POST /get_reward` (OpenRLHF, `openrlhf/utils/agent.py`): `{"query": [text, ...], "prompts", "labels"}` ->
  `{"rewards", "scores", "extra_logs", "truncated"}`.

An ensemble's answers carry its aggregate (`--aggregate`) wherever a single model's reward goes; /get_reward adds
the members' mean and spread to `extra_logs` and /score adds them, with each member's reward, per completion.
- `POST /score` (rmtrain's own): `{"prompt", "completions"}` or `{"groups": [...]}`, a prompt computed once per group.
- `POST /classify`, `/v1/classify` (vLLM's pooling API, which verl's reward loop posts to): `{"model", "input": text |
  [text, ...], "use_activation"}` -> `{"id", "object", "created", "model", "data": [{"index", "label", "probs",
  "num_classes"}], "usage"}`; with activation on (vLLM's default) a one-label score is a sigmoid.
- `POST /v1/embeddings` (SGLang's reward models, verl's other path): `{"model", "input"}` -> `{"data": [{"embedding":
  [score], "index", "object"}], "model", "object", "usage"}`.
- `POST /v1/score/evaluation` (LLaMA-Factory's PPO with `reward_model_type: api`): `{"model", "messages": [text, ...],
  "max_length"}` -> `{"id", "object", "model", "scores"}`.
- `GET /v1/models`: the served model, in the OpenAI list shape vLLM answers.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from rmtrain.aggregate import Reading
from rmtrain.errors import DataError
from rmtrain.groups import Group, scoring_ids
from rmtrain.model import RewardModel
from rmtrain.rows import check_texts, score_group


class BadRequest(ValueError):
    """A request that cannot be scored: answered 400 with this message."""


class TooLarge(ValueError):
    """A request over the server's limits: answered 413 with this message."""


@dataclass
class Scoring:
    """What a request asks for: groups of sequences to score, which were cut to max_length, and the route's options."""

    groups: list[Group]
    truncated: list[list[bool]]
    nested: bool = False
    """/score with `groups`: the answer is a list of lists."""
    options: dict[str, Any] = field(default_factory=dict)


class Tokens:
    """Texts -> token ids exactly as `rmtrain score` makes them, cut from the left beyond `max_length`; at most
    `max_texts` texts a request."""

    def __init__(self, rm: RewardModel, max_length: int, max_texts: int | None = None):
        self.rm, self.max_length, self.max_texts = rm, max_length, max_texts

    def groups(self, requests: list[tuple[Any, list[Any], str]], max_length: int | None = None,
               special_tokens: bool = True) -> tuple[list[Group], list[list[bool]]]:
        texts = sum(len(completions) for _, completions, _ in requests)
        if self.max_texts is not None and texts > self.max_texts:
            raise TooLarge(f"body: {texts} texts, more than this server takes in one request ({self.max_texts}, "
                           "--max-texts-per-request); split the request")
        try:
            encoded = scoring_ids(requests, self.rm.tokenizer, self.rm.fmt, min(max_length or self.max_length, self.max_length), special_tokens)
        except DataError as error:
            raise BadRequest(str(error)) from None
        return [Group.of(0, ids, []) for ids, _ in encoded], [cut for _, cut in encoded]


def checked(check, *args):
    """rmtrain.rows' check of a request's part, its DataError a 400."""
    try:
        return check(*args)
    except DataError as error:
        raise BadRequest(str(error)) from None


def texts_of(value: Any, field_name: str) -> list[str]:
    """A field holding one text or a non-empty list of texts, each checked as `rmtrain score` checks a text."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        got = "missing" if value is None else "an empty list" if isinstance(value, list) else type(value).__name__
        raise BadRequest(f"{field_name}: expected a string or a non-empty list of strings, got {got}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            what = "token ids (send text)" if isinstance(text, int) or isinstance(text, list) else type(text).__name__
            raise BadRequest(f"{field_name}[{i}]: expected a string, got {what}")
        checked(check_texts, None, [(f"{field_name}[{i}]", text)], "body")
    return texts


def _body(body: Any) -> dict:
    if not isinstance(body, dict):
        raise BadRequest(f"body: expected a JSON object, got {type(body).__name__}")
    return body


def _optional(body: dict, key: str, kind: type, check=lambda value: True, what: str = "") -> Any:
    value = body.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool or not check(value)):
        raise BadRequest(f"{key}: expected {what or kind.__name__}, got {value!r}")
    return value


def whole_texts(texts: list[str], field_name: str, tokens: Tokens, max_length: int | None = None, special_tokens: bool = True) -> Scoring:
    return Scoring(*tokens.groups([(None, [text], f"{field_name}[{i}]") for i, text in enumerate(texts)], max_length, special_tokens))


def prompt_tokens(scoring: Scoring) -> int:
    return sum(len(g.prefix) + sum(len(c) for c in g.completions) for g in scoring.groups)


# --------------------------------------------------------------------------------------------------
# OpenRLHF


def parse_get_reward(body: Any, tokens: Tokens) -> Scoring:
    """OpenRLHF's `{"query": [...], "prompts": [...], "labels": [...]}`: each query is one whole text (the prompt's
    and the response's tokens decoded together); `prompts` and `labels` are not needed to score it."""
    queries = _body(body).get("query")
    if not isinstance(queries, list) or not queries:
        raise BadRequest("query: expected a non-empty list of strings")
    return whole_texts(texts_of(queries, "query"), "query", tokens)


def reward_answer(scoring: Scoring, rewards: list[Reading], model: str) -> dict:
    """An ensemble's aggregate in `rewards` and `scores`, its mean and spread in `extra_logs` (which OpenRLHF logs)."""
    flat = [r.reward[0] for r in rewards]
    extra = {} if rewards[0].members is None else {"reward_mean": [r.mean[0] for r in rewards], "reward_std": [r.std[0] for r in rewards]}
    return {"rewards": flat, "scores": flat, "extra_logs": extra, "truncated": [c[0] for c in scoring.truncated]}


# --------------------------------------------------------------------------------------------------
# rmtrain's /score


def parse_score(body: Any, tokens: Tokens) -> Scoring:
    """`{"prompt", "completions"}` or `{"groups": [such objects]}`; each checked as `rmtrain score` checks a row."""
    if isinstance(body, dict) and "groups" in body:
        groups = body["groups"]
        if not isinstance(groups, list) or not groups:
            raise BadRequest("groups: expected a non-empty list of {prompt, completions} objects")
        requests = [(*checked(score_group, g, f"groups[{i}]"), f"groups[{i}]") for i, g in enumerate(groups)]
        return Scoring(*tokens.groups(requests), nested=True)
    return Scoring(*tokens.groups([(*checked(score_group, body, "body"), "body")]))


def score_answer(scoring: Scoring, rewards: list[Reading], model: str) -> dict:
    """Per completion: `rewards` (an ensemble's aggregate), and for an ensemble `reward_mean`, `reward_std` and
    `member_rewards` (each member's), as `rmtrain score` rows carry them."""
    def fields(reading: Reading, truncated: list[bool]) -> dict:
        ensemble = {} if reading.members is None else {"reward_mean": reading.mean, "reward_std": reading.std, "member_rewards": reading.members}
        return {"rewards": reading.reward} | ensemble | {"truncated": truncated}

    if scoring.nested:
        answers = [fields(r, t) for r, t in zip(rewards, scoring.truncated)]
        return {key: [a[key] for a in answers] for key in answers[0]}
    return fields(rewards[0], scoring.truncated[0])


# --------------------------------------------------------------------------------------------------
# vLLM's /classify (verl), SGLang's /v1/embeddings (verl)


def parse_classify(body: Any, tokens: Tokens) -> Scoring:
    """vLLM's classification request. `use_activation` (and the fields it replaced, `activation` and `softmax`, which
    older verl sends; vLLM reads softmax, then activation, then use_activation) turns the sigmoid of a one-label score
    on (vLLM's default) or off; `truncate_prompt_tokens` keeps the last N tokens (-1: the server's max_length);
    `add_special_tokens: false` scores the text as it is, nothing added."""
    body = _body(body)
    activation = True
    for key in ("use_activation", "activation", "softmax"):
        value = _optional(body, key, bool, what="true or false")
        if value is not None:
            activation = value
    keep = _optional(body, "truncate_prompt_tokens", int, lambda v: v == -1 or v >= 1, "a whole number >= 1, or -1")
    add_special = _optional(body, "add_special_tokens", bool, what="true or false")
    _optional(body, "model", str)
    texts = texts_of(body.get("input"), "input")
    scoring = whole_texts(texts, "input", tokens, None if keep in (None, -1) else keep, special_tokens=add_special is not False)
    scoring.options = {"activation": activation, "model": body.get("model")}
    return scoring


def classify_answer(scoring: Scoring, rewards: list[Reading], model: str) -> dict:
    scores = [r.reward[0] for r in rewards]
    if scoring.options.get("activation", True):
        scores = [1 / (1 + math.exp(-s)) if s >= 0 else math.exp(s) / (1 + math.exp(s)) for s in scores]  # sigmoid, no overflow
    used = prompt_tokens(scoring)
    return {
        "id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
        "model": scoring.options.get("model") or model,
        "data": [{"index": i, "label": "LABEL_0", "probs": [s], "num_classes": 1} for i, s in enumerate(scores)],
        "usage": {"prompt_tokens": used, "total_tokens": used, "completion_tokens": 0, "prompt_tokens_details": None},
    }


def parse_embeddings(body: Any, tokens: Tokens) -> Scoring:
    """SGLang's embedding request, which a reward model answers with its raw score."""
    body = _body(body)
    _optional(body, "model", str)
    scoring = whole_texts(texts_of(body.get("input"), "input"), "input", tokens)
    scoring.options = {"model": body.get("model")}
    return scoring


def embeddings_answer(scoring: Scoring, rewards: list[Reading], model: str) -> dict:
    used = prompt_tokens(scoring)
    return {
        "data": [{"embedding": [r.reward[0]], "index": i, "object": "embedding"} for i, r in enumerate(rewards)],
        "model": model, "object": "list", "usage": {"prompt_tokens": used, "total_tokens": used},
    }


# --------------------------------------------------------------------------------------------------
# LLaMA-Factory


def parse_score_evaluation(body: Any, tokens: Tokens) -> Scoring:
    """LLaMA-Factory's `{"model", "messages": [text, ...], "max_length"}`: each message one whole text (the prompt's
    and the response's tokens decoded together, special tokens as text)."""
    body = _body(body)
    _optional(body, "model", str)
    max_length = _optional(body, "max_length", int, lambda v: v >= 1, "a whole number >= 1")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: expected a non-empty list of strings")
    scoring = whole_texts(texts_of(messages, "messages"), "messages", tokens, max_length)
    scoring.options = {"model": body.get("model")}
    return scoring


def score_evaluation_answer(scoring: Scoring, rewards: list[Reading], model: str) -> dict:
    return {"id": f"scoreval-{uuid.uuid4().hex}", "object": "score.evaluation", "model": scoring.options.get("model") or model,
            "scores": [r.reward[0] for r in rewards]}


def models_answer(model: str, root: str, max_length: int, created: int) -> dict:
    """`GET /v1/models` as vLLM answers it: the one served model."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "rmtrain", "root": root,
                                        "parent": None, "max_model_len": max_length, "permission": []}]}
