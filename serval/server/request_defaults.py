"""The model's sampling defaults (`--generation-config`) filled into a request's SamplingParams: only the fields
the request left out; an explicit value, even the SamplingParams default, wins."""
from __future__ import annotations

from serval.model.generation_config import GenerationDefaults
from serval.openai import protocol
from serval.sampling_params import SamplingParams


def with_defaults(params: SamplingParams, body, defaults: GenerationDefaults | None) -> SamplingParams:
    """`params` (built from `body`) with the defaults for what `body` didn't give; `params` itself without any."""
    if defaults is None:
        return params
    changes = {name: value for name, value in defaults.values().items()
               if name != "max_tokens" and getattr(body, name, None) is None}
    if defaults.max_tokens is not None and not _max_tokens_given(body):
        changes["max_tokens"] = defaults.max_tokens
        if params.min_tokens > defaults.max_tokens:  # the request's min_tokens wins over a default cap
            changes["max_tokens"] = params.min_tokens
    return params.clone(**changes) if changes else params


def _max_tokens_given(body) -> bool:
    if isinstance(body, protocol.ChatCompletionRequest):
        return body.requested_max_tokens is not None
    if isinstance(body, protocol.CompletionRequest):  # its field defaults to 16 (OpenAI's), so "given" is "sent"
        return "max_tokens" in body.model_fields_set
    return getattr(body, "max_tokens", None) is not None  # the Responses API's max_output_tokens
