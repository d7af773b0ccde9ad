"""The server's adapters by name: what `--lora-modules` names at start and /v1/load_lora_adapter adds while
serving. A request's `model` field picks one. Torch-free (the server's admission reads it on the event loop).

Ids: the modules of --lora-modules get 1..n in the order given, each later load the next number, never reused, so
an adapter unloaded and loaded again under the same name (perhaps from another folder) never shares a prefix-cache
block or a resident slot with its former self.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

from serval.lora.request import LoRARequest
from serval.openai.errors import APIError, InvalidArgument


@dataclass(frozen=True)
class LoRAModulePath:
    """One --lora-modules entry: `name=path`, or JSON {"name": ..., "path": ..., "base_model_name": ...}."""
    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(text: str) -> LoRAModulePath:
    """Raises InvalidArgument("lora_modules", ...) for anything but the two forms."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as error:
            raise InvalidArgument("lora_modules", f"invalid --lora-modules {text!r}: not JSON ({error})") from None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not isinstance(
                value.get("path"), str) or set(value) - {"name", "path", "base_model_name"}:
            raise InvalidArgument("lora_modules", f"invalid --lora-modules {text!r}: allowed JSON with \"name\" and "
                                                  "\"path\" (strings) and optionally \"base_model_name\"")
        return LoRAModulePath(value["name"], value["path"], value.get("base_model_name"))
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise InvalidArgument("lora_modules", f"invalid --lora-modules {text!r}: allowed name=path or JSON "
                                              "{\"name\": ..., \"path\": ..., \"base_model_name\": ...}")
    return LoRAModulePath(name, path)


class LoRARegistry:
    def __init__(self, modules: list[LoRAModulePath], served_model_names: list[str]) -> None:
        self.served_model_names = list(served_model_names)
        self._ids = itertools.count(1)
        self._by_name: dict[str, LoRARequest] = {}
        for module in modules:
            self.add(module.name, module.path, module.base_model_name)

    def get(self, name: str | None) -> LoRARequest | None:
        return self._by_name.get(name) if name is not None else None

    def adapters(self) -> list[LoRARequest]:
        return list(self._by_name.values())

    def new_request(self, name: str, path: str, base_model_name: str | None = None) -> LoRARequest:
        """A request for an adapter not yet registered (with the next id); APIError 400 if the name is taken."""
        self.check_free(name)
        return LoRARequest(name, next(self._ids), path, base_model_name)

    def check_free(self, name: str) -> None:
        if name in self.served_model_names or name in self._by_name:
            raise APIError(400, f"The LoRA adapter name `{name}` is already taken (by "
                                f"{'the base model' if name in self.served_model_names else 'a loaded adapter'}); "
                                "unload it first or choose another name.", param="lora_name")

    def register(self, request: LoRARequest) -> None:
        self.check_free(request.lora_name)
        self._by_name[request.lora_name] = request

    def add(self, name: str, path: str, base_model_name: str | None = None) -> LoRARequest:
        request = self.new_request(name, path, base_model_name)
        self.register(request)
        return request

    def remove(self, name: str) -> LoRARequest:
        """APIError 404 if no adapter has that name."""
        request = self._by_name.pop(name, None)
        if request is None:
            raise APIError(404, f"The LoRA adapter `{name}` is not loaded; loaded: {sorted(self._by_name)}.",
                           type="not_found_error", param="lora_name", code="model_not_found")
        return request


def preload_lora_modules(engine, config) -> None:
    """Read and check --lora-modules' adapters before serving, with the ids the server's registry gives them
    (ServerState builds the same LoRARegistry from the same config); raises for the first bad one."""
    for request in LoRARegistry(config.lora_modules, config.served_model_names).adapters():
        engine.add_lora(request)
