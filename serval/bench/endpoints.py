"""Endpoints under test: name, OpenAI base URL, model, API; from --base-url flags or an endpoints YAML file.

endpoints.yaml:
    endpoints:
      - {name: serval, base_url: http://127.0.0.1:8000, model: smollm2, engine: serval}
      - {name: vllm, base_url: http://127.0.0.1:8001/v1, model: HuggingFaceTB/SmolLM2-135M-Instruct, api_key: KEY}
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import yaml

APIS = ("completions", "chat")
ENGINES = ("serval", "vllm", "sglang", "tensorrt-llm", "lmdeploy")


@dataclass
class Endpoint:
    name: str
    base_url: str  # ending in /v1; added when missing
    model: str
    api: str = "completions"
    api_key: str | None = None
    engine: str | None = None  # which engine serves it, for `serval advise`; guessed from the name if unset
    extra_body: dict = field(default_factory=dict)  # merged into every request body

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"invalid base URL for endpoint {self.name!r}: {self.base_url!r}; allowed: http(s)://host:port[/v1]")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        if self.api not in APIS:
            raise ValueError(f"invalid api for endpoint {self.name!r}: {self.api!r}; allowed: {', '.join(APIS)}")
        if self.engine is None:
            self.engine = next((engine for engine in ENGINES if engine.split("-")[0] in self.name.lower()), None)

    @property
    def url(self) -> str:
        return self.base_url + ("/chat/completions" if self.api == "chat" else "/completions")

    def to_json(self) -> dict:
        row = asdict(self)
        row.pop("api_key")  # never written to result files
        return row


def load_endpoints(base_urls: list[str] | None, endpoints_file: str | None, model: str | None,
                   api: str = "completions") -> list[Endpoint]:
    endpoints = []
    for index, base_url in enumerate(base_urls or []):
        name, sep, url = base_url.partition("=")  # name=URL names an endpoint on the command line
        if not sep or name.startswith("http"):
            name, url = f"endpoint{index}" if len(base_urls) > 1 else "endpoint", base_url
        if not model:
            raise ValueError("invalid arguments: --model is required with --base-url")
        endpoints.append(Endpoint(name=name, base_url=url, model=model, api=api))
    if endpoints_file:
        with open(endpoints_file) as handle:
            data = yaml.safe_load(handle) or {}
        rows = data.get("endpoints", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ValueError(f"invalid {endpoints_file}: expected a list under 'endpoints'")
        for index, row in enumerate(rows):
            missing = [key for key in ("base_url",) if key not in row]
            if missing or not (row.get("model") or model):
                raise ValueError(f"invalid {endpoints_file} entry {index}: needs base_url and model (or --model)")
            endpoints.append(Endpoint(**{"name": f"endpoint{index}", "model": model, "api": api, **row}))
    if not endpoints:
        raise ValueError("invalid arguments: give --base-url URL (repeatable) or --endpoints FILE")
    names = [endpoint.name for endpoint in endpoints]
    if len(set(names)) != len(names):
        raise ValueError(f"invalid endpoints: names must be unique, got {names}")
    return endpoints
