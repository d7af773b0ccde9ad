"""LLM: the offline Python API, with vLLM's names (generate, chat; with runner="pooling": embed, score, encode)."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from functools import partial

from pydantic import ValidationError
from tqdm.auto import tqdm

from serval.config import EngineConfig
from serval.engine.engine import LLMEngine
from serval.engine.pooling import EmbeddingOutput, EmbeddingRequestOutput, PoolingRequestOutput, ScoringOutput, \
    ScoringRequestOutput, cosine_similarity, pair_token_ids
from serval.engine.input_processor import PromptType
from serval.lora.request import LoRARequest
from serval.model.generation_config import load_generation_defaults
from serval.openai.embeddings import score_pairs
from serval.openai.errors import InvalidArgument
from serval.openai.reasoning import get_reasoning_parser
from serval.openai.tool_grammar import tool_call_grammar
from serval.openai.tool_parsers import get_tool_parser
from serval.openai.tool_parsers.chat_output import chat_output_parser
from serval.openai.tools import NamedToolChoice, ToolRequestFields
from serval.outputs import RequestOutput
from serval.pooling_params import PoolingParams
from serval.sampling_params import SamplingParams, StructuredOutputsParams

Conversation = list[dict]


class LLM:
    def __init__(self, model: str | None = None, tokenizer: str | None = None, generation_config: str = "auto",
                 tool_call_parser: str | None = None, reasoning_parser: str | None = None, **engine_args) -> None:
        """generation_config: where the default sampling parameters come from, as `serval serve
        --generation-config`: "auto" (the model's generation_config.json; the built-in model's card), "vllm"
        (SamplingParams' own) or a folder holding a generation_config.json. `tool_call_parser` and
        `reasoning_parser` are `serval serve`'s flags of the same names: how `chat` reads tool calls and the think
        section out of the output."""
        self.generation_defaults = load_generation_defaults(generation_config, model)
        if tool_call_parser is not None:
            get_tool_parser(tool_call_parser)  # an unknown name fails here, with the valid ones
        if reasoning_parser is not None:
            get_reasoning_parser(reasoning_parser)
        self.tool_call_parser, self.reasoning_parser = tool_call_parser, reasoning_parser
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, tokenizer=tokenizer, **engine_args))
        self._request_counter = itertools.count()

    def shutdown(self) -> None:
        """Stop the engine's worker processes (tensor parallelism) now rather than at interpreter exit; nothing to
        stop for a single-process engine."""
        self.engine.shutdown()

    def start_profile(self, trace_dir: str | None = None) -> None:
        """vLLM's LLM.start_profile: torch's profiler over the steps until stop_profile, its trace written under
        trace_dir, else SERVAL_TORCH_PROFILER_DIR (serval.engine.profiler)."""
        self.engine.start_profile(trace_dir)

    def stop_profile(self) -> str:
        """Stop the profile; returns the path of the trace written."""
        return self.engine.stop_profile()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What a prompt given no SamplingParams runs with: the model's defaults (vLLM's name)."""
        return SamplingParams(**self.generation_defaults.values())

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; outputs come back in the order of the prompts. lora_request: the adapter
        (serval.lora.LoRARequest) every prompt runs with, or one per prompt (None: the base model); needs
        enable_lora=True."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = _per_prompt(sampling_params, len(prompts), "sampling_params")
        priorities = _per_prompt(priority, len(prompts), "priority") if priority is not None else [0] * len(prompts)
        lora_requests = _per_prompt(lora_request, len(prompts), "lora_request")
        request_ids = []
        try:
            for prompt, prompt_params, prompt_priority, prompt_lora in zip(prompts, params, priorities, lora_requests):
                request_id = str(next(self._request_counter))
                self.engine.add_request(request_id, prompt, prompt_params or self.get_default_sampling_params(),
                                        prompt_priority, stream=False, lora_request=prompt_lora)
                request_ids.append(request_id)
        except Exception:
            self.engine.abort_request(request_ids)  # one bad prompt: none of the batch runs
            raise
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
             tools: list[dict] | None = None, tool_choice: str | dict | None = None,
             parallel_tool_calls: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation (with `tools`, OpenAI's function tools), then
        generate. With tools or a reasoning parser, each completion's `tool_calls` and `reasoning_content` hold
        what the parsers read out of its text; `tool_choice` "required" or a named function is enforced by a
        grammar, as in the server."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template; this engine has none")
        tool_request = _tool_request(tools, tool_choice, parallel_tool_calls)
        new_parser = partial(chat_output_parser, self.tool_call_parser, self.reasoning_parser,
                             tool_request.tool_dicts(), tool_request.resolved_tool_choice(), True,
                             chat_template_kwargs)
        parser = new_parser()  # checks the choice against the parsers (required needs --tool-call-parser)
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, tokenize=False, chat_template=chat_template, tools=tool_request.template_tools(),
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message, **(chat_template_kwargs or {}))
            # The template already holds BOS where the model wants it.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        params = [self._chat_params(prompt_params or self.get_default_sampling_params(), tool_request, parser, chat_template_kwargs)
                  for prompt_params in _per_prompt(sampling_params, len(prompts), "sampling_params")]
        outputs = self.generate(prompts, params, use_tqdm=use_tqdm)
        if parser.reasoning is not None or parser.tools is not None:
            for completion in (completion for output in outputs for completion in output.outputs):
                choice_parser = new_parser()
                choice_parser.feed(completion.text)
                choice_parser.finish()
                parsed = choice_parser.result()
                completion.tool_calls, completion.reasoning_content = parsed.tool_calls, parsed.reasoning
        return outputs

    def _chat_params(self, params: SamplingParams, tool_request: ToolRequestFields, parser,
                     chat_template_kwargs: dict | None) -> SamplingParams:
        """What the server's admission does to a chat request's params: the tool-choice grammar (after the think
        section when thinking is on), special tokens kept when the call markers are special tokens."""
        changes: dict = {}
        if parser.reads_special_tokens:
            changes["skip_special_tokens"] = False
        stop_token_ids = parser.stop_token_ids(self.get_tokenizer().get_added_vocab(), params.stop_token_ids)
        if stop_token_ids != (params.stop_token_ids or []):
            changes["stop_token_ids"] = stop_token_ids
        choice = tool_request.resolved_tool_choice()
        if parser.tools is not None and (choice == "required" or isinstance(choice, NamedToolChoice)):
            added = self.get_tokenizer().get_added_vocab()
            grammar = tool_call_grammar(self.tool_call_parser, tool_request.tool_dicts(),
                                        choice.model_dump() if isinstance(choice, NamedToolChoice) else choice,
                                        tool_request.parallel_tool_calls, added)
            if (parser.reasoning is not None and not parser.tools.reads_reasoning
                    and parser.reasoning.thinking_enabled(chat_template_kwargs)):
                grammar = type(parser.reasoning).constrain_after_reasoning(grammar, added)
            changes["structured_outputs"] = StructuredOutputsParams(grammar=grammar)
        return dataclasses.replace(params, **changes) if changes else params

    # ---- pooling models (runner="pooling") ----
    def encode(self, prompts: PromptType | Sequence[PromptType], pooling_params: PoolingParams | None = None,
               use_tqdm: bool = True) -> list[PoolingRequestOutput]:
        """Each prompt's pooled output (outputs.data: the embedding, or a classifier's scores), in prompt order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = pooling_params or PoolingParams()
        request_ids = []
        try:
            for prompt in prompts:
                request_id = str(next(self._request_counter))
                self.engine.add_request(request_id, prompt, params, stream=False)
                request_ids.append(request_id)
        except Exception:
            self.engine.abort_request(request_ids)
            raise
        outputs = self._run(request_ids, use_tqdm)
        failed = [output.request_id for output in outputs if output.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"requests {failed} failed inside the engine (the log says why)")
        return outputs

    def embed(self, prompts: PromptType | Sequence[PromptType], pooling_params: PoolingParams | None = None,
              use_tqdm: bool = True, prompt_name: str | None = None) -> list[EmbeddingRequestOutput]:
        """Embeddings (outputs.embedding) pooled as the model's config says (vLLM's LLM.embed). prompt_name:
        sentence-transformers' named instruction (config_sentence_transformers.json, e.g. "query") put before each
        text prompt; None: the config's default prompt, if any."""
        prefix = self.engine.instruction_prefix(prompt_name)
        if prefix:
            prompts = [prefix + prompt if isinstance(prompt, str) else prompt
                       for prompt in ([prompts] if isinstance(prompts, (str, dict)) else prompts)]
        return [EmbeddingRequestOutput(output.request_id, output.prompt_token_ids,
                                       EmbeddingOutput(output.outputs.data.tolist()))
                for output in self.encode(prompts, pooling_params, use_tqdm)]

    def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str],
              pooling_params: PoolingParams | None = None, use_tqdm: bool = True) -> list[ScoringRequestOutput]:
        """Relevance of each text_2 to text_1 (one text_1 against many, or pairs of equal lists), vLLM's LLM.score:
        a cross-encoder (sequence classifier) reads each pair as one prompt; an embedder scores the cosine
        similarity of the two embeddings."""
        pairs = score_pairs(text_1, text_2)
        if self.engine.pooling_task is None:
            raise InvalidArgument("model", "score needs a pooling model (runner='pooling')")
        if self.engine.pooling_task == "classify":
            prompts = [{"prompt": f"{first}{second}",
                        "prompt_token_ids": pair_token_ids(self.get_tokenizer(), first, second)}
                       for first, second in pairs]
            outputs = self.encode(prompts, pooling_params, use_tqdm)
            return [ScoringRequestOutput(output.request_id, output.prompt_token_ids,
                                         ScoringOutput(float(output.outputs.data[0]))) for output in outputs]
        firsts = self.encode([first for first, _ in pairs], pooling_params, use_tqdm)
        seconds = self.encode([second for _, second in pairs], pooling_params, use_tqdm)
        return [ScoringRequestOutput(second.request_id, first.prompt_token_ids + second.prompt_token_ids,
                                     ScoringOutput(cosine_similarity(first.outputs.data, second.outputs.data)))
                for first, second in zip(firsts, seconds)]

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm, unit="req") as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[request_id] for request_id in request_ids]


def _tool_request(tools: list[dict] | None, tool_choice, parallel_tool_calls: bool) -> ToolRequestFields:
    """The tool fields checked as the server checks them; InvalidArgument names the one at fault."""
    try:
        return ToolRequestFields.model_validate({"tools": tools, "tool_choice": tool_choice,
                                                 "parallel_tool_calls": parallel_tool_calls})
    except ValidationError as error:
        first = error.errors()[0]
        wrapped = first.get("ctx", {}).get("error")
        if isinstance(wrapped, InvalidArgument):
            raise wrapped from None
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidArgument(where or "tools", f"invalid {where or 'tools'}: {first['msg']}") from None


def _per_prompt(value, count: int, name: str) -> list:
    if value is None or not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"invalid {name}: {len(value)} given for {count} prompts; allowed one, or one per prompt")
    return list(value)
