"""Function tools for chat workloads: what `--tools FILE.json` or `--tool-workload` adds to every chat request,
with `--tool-choice`, so the benchmark measures the tool-calling path (the tools rendered into the prompt, the
output parsed, and for `required` or a named function the grammar-constrained sampler).

A tools file is a JSON list of OpenAI function tools (`{"type": "function", "function": {...}}`), or an object
with that list under "tools".
"""
from __future__ import annotations

import json
from dataclasses import dataclass

TOOL_CHOICES = ("none", "auto", "required")

# A small agent's toolbox: typed parameters, enums, nesting and a parameterless tool, as real tool lists have.
BUILTIN_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather and a short forecast for a city.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"], "properties": {
            "city": {"type": "string", "description": "City name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}},
    {"type": "function", "function": {
        "name": "search_flights", "description": "Search direct and one-stop flights between two airports.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["origin", "destination", "date"],
                       "properties": {
                           "origin": {"type": "string", "description": "IATA code"},
                           "destination": {"type": "string", "description": "IATA code"},
                           "date": {"type": "string", "description": "YYYY-MM-DD"},
                           "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                           "cabin": {"type": "string", "enum": ["economy", "premium", "business", "first"]}}}}},
    {"type": "function", "function": {
        "name": "create_calendar_event", "description": "Add an event to the user's calendar.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["title", "start"],
                       "properties": {
                           "title": {"type": "string"}, "start": {"type": "string", "description": "ISO 8601"},
                           "duration_minutes": {"type": "integer", "minimum": 5},
                           "attendees": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
                           "reminder": {"type": "object", "additionalProperties": False,
                                        "properties": {"minutes_before": {"type": "integer"}}}}}}},
    {"type": "function", "function": {
        "name": "lookup_order", "description": "Status of a customer order.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["order_id"],
                       "properties": {"order_id": {"type": "string"},
                                      "include_items": {"type": "boolean"}}}}},
    {"type": "function", "function": {"name": "get_time", "description": "The current time in UTC."}},
]


@dataclass
class ToolOptions:
    """The tools every chat request carries and its tool_choice: none, auto, required or a function's name."""
    tools: list[dict]
    tool_choice: str = "auto"

    def __post_init__(self) -> None:
        names = [tool.get("function", {}).get("name") for tool in self.tools]
        if not self.tools or any(tool.get("type") != "function" or not name
                                 for tool, name in zip(self.tools, names)):
            raise ValueError("invalid tools: need a non-empty list of {\"type\": \"function\", \"function\": "
                             "{\"name\": ..., \"parameters\": ...}}")
        if self.tool_choice not in TOOL_CHOICES and self.tool_choice not in names:
            raise ValueError(f"invalid --tool-choice: {self.tool_choice!r}; allowed: {', '.join(TOOL_CHOICES)} or "
                             f"a tool's name ({', '.join(names)})")

    def body_fields(self) -> dict:
        choice = self.tool_choice if self.tool_choice in TOOL_CHOICES else \
            {"type": "function", "function": {"name": self.tool_choice}}
        return {"tools": self.tools, "tool_choice": choice}


def load_tools(path: str | None, builtin: bool) -> list[dict] | None:
    """The tools from `--tools FILE.json`, or the built-in ones for `--tool-workload`; None without either."""
    if path is not None and builtin:
        raise ValueError("invalid arguments: give --tools FILE or --tool-workload, not both")
    if builtin:
        return BUILTIN_TOOLS
    if path is None:
        return None
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"invalid --tools: {path}: {error}") from None
    tools = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(tools, list):
        raise ValueError(f"invalid --tools: {path} must hold a list of function tools (or one under 'tools')")
    return tools


def tool_options(path: str | None, builtin: bool, tool_choice: str | None, api: str) -> ToolOptions | None:
    tools = load_tools(path, builtin)
    if tools is None:
        if tool_choice is not None:
            raise ValueError("invalid arguments: --tool-choice needs --tools FILE or --tool-workload")
        return None
    if api != "chat":
        raise ValueError("invalid arguments: tools need --api chat")
    return ToolOptions(tools, tool_choice or "auto")
