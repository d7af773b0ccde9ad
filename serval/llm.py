"""LLM: the offline Python API, with vLLM's names (generate, chat)."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from serval.config import EngineConfig
from serval.engine.engine import LLMEngine
from serval.engine.input_processor import PromptType
from serval.outputs import RequestOutput
from serval.sampling_params import SamplingParams

Conversation = list[dict]


class LLM:
    def __init__(self, model: str | None = None, tokenizer: str | None = None, **engine_args) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, tokenizer=tokenizer, **engine_args))
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; outputs come back in the order of the prompts."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = _per_prompt(sampling_params, len(prompts), "sampling_params")
        priorities = _per_prompt(priority, len(prompts), "priority") if priority is not None else [0] * len(prompts)
        request_ids = []
        try:
            for prompt, prompt_params, prompt_priority in zip(prompts, params, priorities):
                request_id = str(next(self._request_counter))
                self.engine.add_request(request_id, prompt, prompt_params or SamplingParams(), prompt_priority,
                                        stream=False)
                request_ids.append(request_id)
        except Exception:
            self.engine.abort_request(request_ids)  # one bad prompt: none of the batch runs
            raise
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template; this engine has none")
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, tokenize=False, chat_template=chat_template,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message, **(chat_template_kwargs or {}))
            # The template already holds BOS where the model wants it.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm, unit="req") as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[request_id] for request_id in request_ids]


def _per_prompt(value, count: int, name: str) -> list:
    if value is None or not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"invalid {name}: {len(value)} given for {count} prompts; allowed one, or one per prompt")
    return list(value)
