"""What a gateway with several engines shows of them: `/metrics/upstream` and `/v1/models`.

One gateway, three engines: one that never starts listening (`dead`, a child that sleeps) and two
simulators serving different model names (`chat`, `code`), so both views are checked with a
replica that does not answer. The answers are parsed with the clients people use
(prometheus_client's text parser, the openai SDK).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from jose import jwt as jose_jwt
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_engines import SIM, engines_env, wait_replicas
from tests.support import TEST_KEY, gateway

DEAD = '{python} -c "import time; time.sleep(300)" --port {port}'  # a child that never answers
JWT_SECRET = "engines-views-jwt-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    engines = [
        {"model": "dead", "command": DEAD},  # first: a request naming no model would go there
        {"model": "chat", "command": SIM + " --model chat"},
        {"model": "code", "command": SIM + " --model code"},
    ]
    audit = tmp_path_factory.mktemp("views") / "audit.jsonl"
    env = engines_env(engines, audit, BASTION_JWT_SECRET=JWT_SECRET)
    with gateway(env=env, ready=False) as (_, url):
        wait_replicas(url, "chat", 1)
        wait_replicas(url, "code", 1)
        yield url


def test_upstream_metrics_relay_every_engine_with_an_engine_label(base: str) -> None:
    relayed = httpx.get(base + "/metrics/upstream", timeout=10)
    assert relayed.status_code == 200, relayed.text
    assert relayed.headers["content-type"].startswith("text/plain")
    # One HELP and one TYPE per family, however many engines have it.
    for kind in ("# HELP ", "# TYPE "):
        declared = [line.split()[2] for line in relayed.text.splitlines() if line.startswith(kind)]
        assert declared and len(declared) == len(set(declared)), collections.Counter(declared).most_common(3)
    families = {family.name: family for family in text_string_to_metric_families(relayed.text)}
    running = {(s.labels["engine"], s.labels["model_name"]) for s in families["vllm:num_requests_running"].samples}
    assert running == {("chat/0", "chat"), ("code/0", "code")}
    assert all("engine" in s.labels for family in families.values() for s in family.samples)
    up = {s.labels["engine"]: s.value for s in families["bastion_upstream_scrape_up"].samples}
    assert up == {"chat/0": 1.0, "code/0": 1.0, "dead/0": 0.0}

    ours = {f.name: f for f in text_string_to_metric_families(httpx.get(base + "/metrics").text)}
    errors = {s.labels["engine"]: s.value for s in ours["bastion_upstream_scrape_errors"].samples}
    assert errors.get("dead/0", 0) >= 1 and "chat/0" not in errors


def test_models_list_is_each_engines_own_card_filtered_per_principal(base: str) -> None:
    everyone = openai.OpenAI(base_url=base + "/v1", api_key=TEST_KEY, max_retries=0)
    cards = {model.id: model.model_dump() for model in everyone.models.list()}
    assert list(cards) == ["dead", "chat", "code"]  # in configuration order, the first one not ready
    for name in ("chat", "code"):  # the simulator's card, as vLLM writes it
        assert cards[name]["owned_by"] == "vllm" and cards[name]["max_model_len"] == 32768
        assert cards[name]["root"] == name
    assert cards["dead"]["owned_by"] == "bastion"  # no ready replica: a synthesized entry, never an omission

    now = int(time.time())
    token = jose_jwt.encode({"sub": "ci", "exp": now + 600, "models": ["code"]}, JWT_SECRET, algorithm="HS256")
    restricted = openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0)
    [only] = restricted.models.list()
    assert only.id == "code" and only.model_dump()["max_model_len"] == 32768


def test_one_models_card_comes_from_its_own_engine_and_an_unknown_one_is_404(base: str) -> None:
    """`GET /v1/models/{model}` (the SDK's `models.retrieve`) was forwarded like a request naming no model: to the
    first engine (here one that never answers: a 503), whatever model the path named."""
    everyone = openai.OpenAI(base_url=base + "/v1", api_key=TEST_KEY, max_retries=0)
    listed = {model.id: model.model_dump() for model in everyone.models.list()}
    for name in ("chat", "code", "dead"):
        assert everyone.models.retrieve(name).model_dump() == listed[name], name
    with pytest.raises(openai.NotFoundError) as missing:
        everyone.models.retrieve("CODE")
    assert missing.value.code == "model_not_found"

    now = int(time.time())
    token = jose_jwt.encode({"sub": "ci", "exp": now + 600, "models": ["code"]}, JWT_SECRET, algorithm="HS256")
    restricted = openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0)
    assert restricted.models.retrieve("code").id == "code"
    with pytest.raises(openai.PermissionDeniedError):
        restricted.models.retrieve("chat")
