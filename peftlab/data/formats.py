"""Dataset formats: Alpaca, ShareGPT, OpenAI messages and plain text, checked record by record.

Four on-disk schemas (the first three as LLaMA-Factory defines them) normalise to one `Example`:

  alpaca   {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
           -> history turns, then user = instruction + "\\n" + input (input omitted when empty),
              assistant = output
  sharegpt {"conversations": [{"from", "value"}, ...], "system"?, "tools"?}
           from: human | gpt | observation | function_call (user/assistant/tool are accepted as
           aliases; a leading "system" turn is the system prompt). User side (human,
           observation) at positions 0, 2, 4, ...; assistant side (gpt, function_call) at 1, 3, ...
  openai   {"messages": [{"role", "content"}, ...], "tools"?}
           role: system (leading only) | user | assistant | tool (-> observation). An assistant
           message with "tool_calls" and no content becomes a function_call turn whose content is
           the JSON of the calls.
  text     {"text"} (pretraining)

Files are a JSON list (`.json`) or one object per line (`.jsonl`; blank lines are not records).
`format="auto"` decides from the first record's keys. Every malformed record raises `DataError`
naming the file, the record index (0-based), the line (JSONL) and the field; with
`skip_invalid=True` such records are skipped instead, counted in `LoadReport` (attached to the
returned list as `.report`) and announced with `warnings.warn`, never dropped silently.
Keys a schema does not define are kept in `Example.meta` (e.g. the synthetic world's `relation`).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..errors import DataError
from ..tokenizer import ASSISTANT_SIDE, USER_SIDE

FORMATS = ("auto", "alpaca", "sharegpt", "openai", "text")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "observation": "observation", "tool": "observation",
                  "function_call": "function_call"}
OPENAI_ROLES = {"user": "user", "assistant": "assistant", "tool": "observation"}
_SCHEMA_KEYS = {
    "alpaca": {"instruction", "input", "output", "system", "history"},
    "sharegpt": {"conversations", "system", "tools"},
    "openai": {"messages", "tools"},
    "text": {"text"},
}


@dataclass
class Message:
    role: str  # user | assistant | observation | function_call
    content: str


@dataclass
class Example:
    """One normalised record: a conversation (`messages`) or, for pretraining, `text`."""

    messages: List[Message] = field(default_factory=list)
    system: Optional[str] = None
    tools: Optional[str] = None
    text: Optional[str] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_text(self) -> bool:
        return self.text is not None


@dataclass
class LoadReport:
    """What `load_dataset` read: records seen, loaded, skipped, and the first reasons."""

    path: str
    format: str
    n_records: int = 0
    n_loaded: int = 0
    n_skipped: int = 0
    reasons: List[str] = field(default_factory=list)

    def summary(self) -> str:
        s = (f"{self.path}: {self.n_loaded} of {self.n_records} records loaded as {self.format}, "
             f"{self.n_skipped} invalid skipped")
        if self.reasons:
            s += "; first reasons: " + " | ".join(self.reasons)
        return s


class ExampleList(list):
    """A list of `Example` with the `LoadReport` of the file it came from."""

    report: LoadReport


class _Bad(Exception):
    """A record-level problem: `field` and `reason`, located by the caller."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"field '{field}': {reason}")
        self.field, self.reason = field, reason


# ----------------------------------------------------------------------------- field checks
def _str(rec: dict, key: str, required: bool, where: Optional[str] = None) -> Optional[str]:
    where = where or key
    if key not in rec or rec[key] is None:
        if required:
            raise _Bad(where, "missing")
        return None
    v = rec[key]
    if not isinstance(v, str):
        raise _Bad(where, f"expected a string, got {type(v).__name__}")
    return v


def _tools(rec: dict) -> Optional[str]:
    v = rec.get("tools")
    if v is None or v == "":
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False, sort_keys=True)
    raise _Bad("tools", f"expected a string, list or object, got {type(v).__name__}")


def check_turns(messages: List[Message], field_name: str) -> None:
    """Alternation (user side first, assistant side last) and non-empty contents."""
    if not messages:
        raise _Bad(field_name, "no turns")
    for j, m in enumerate(messages):
        expected = USER_SIDE if j % 2 == 0 else ASSISTANT_SIDE
        if m.role not in expected:
            raise _Bad(f"{field_name}[{j}]", f"role {m.role!r} out of order: expected "
                       f"{' or '.join(expected)} at position {j}")
        if not m.content.strip():
            what = "empty answer" if m.role in ASSISTANT_SIDE else "empty message"
            raise _Bad(f"{field_name}[{j}]", what)
    if messages[-1].role not in ASSISTANT_SIDE:
        raise _Bad(f"{field_name}[{len(messages) - 1}]",
                   "conversation must end with an assistant turn (nothing to train on otherwise)")


def _meta(rec: dict, fmt: str) -> Dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in _SCHEMA_KEYS[fmt]}


# ----------------------------------------------------------------------------- per schema
def _alpaca(rec: dict) -> Example:
    instruction = _str(rec, "instruction", True)
    query = _str(rec, "input", False) or ""
    output = _str(rec, "output", True)
    system = _str(rec, "system", False)
    if not instruction.strip() and not query.strip():
        raise _Bad("instruction", "empty (and no input)")
    if not output.strip():
        raise _Bad("output", "empty answer")
    messages: List[Message] = []
    history = rec.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise _Bad("history", f"expected a list of [user, assistant] pairs, got {type(history).__name__}")
        for j, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(isinstance(x, str) for x in pair)):
                raise _Bad(f"history[{j}]", "expected a [user, assistant] pair of strings")
            if not pair[0].strip():
                raise _Bad(f"history[{j}][0]", "empty message")
            if not pair[1].strip():
                raise _Bad(f"history[{j}][1]", "empty answer")
            messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    user = f"{instruction}\n{query}" if query and instruction else (instruction or query)
    messages += [Message("user", user), Message("assistant", output)]
    return Example(messages=messages, system=system or None, meta=_meta(rec, "alpaca"))


def _turn_list(rec: dict, key: str) -> List[Any]:
    turns = rec.get(key)
    if turns is None:
        raise _Bad(key, "missing")
    if not isinstance(turns, list):
        raise _Bad(key, f"expected a list, got {type(turns).__name__}")
    if not turns:
        raise _Bad(key, "empty list")
    for j, t in enumerate(turns):
        if not isinstance(t, dict):
            raise _Bad(f"{key}[{j}]", f"expected an object, got {type(t).__name__}")
    return turns


def _sharegpt(rec: dict) -> Example:
    turns = _turn_list(rec, "conversations")
    system = _str(rec, "system", False)
    messages: List[Message] = []
    for j, t in enumerate(turns):
        role = _str(t, "from", True, f"conversations[{j}].from")
        value = _str(t, "value", True, f"conversations[{j}].value")
        if role == "system" and j == 0:
            if system is not None:
                raise _Bad("conversations[0].from", "a system turn and a 'system' field were both given")
            system = value
            continue
        if role not in SHAREGPT_ROLES:
            raise _Bad(f"conversations[{j}].from", f"unknown role {role!r}; expected one of "
                       f"{', '.join(sorted(SHAREGPT_ROLES))}")
        messages.append(Message(SHAREGPT_ROLES[role], value))
    _check_with_offset(messages, "conversations", 1 if len(messages) < len(turns) else 0)
    return Example(messages=messages, system=system or None, tools=_tools(rec),
                   meta=_meta(rec, "sharegpt"))


def _check_with_offset(messages: List[Message], key: str, offset: int) -> None:
    """`check_turns`, reporting positions in the file's list (shifted by a leading system turn)."""
    try:
        check_turns(messages, key)
    except _Bad as e:
        if offset and "[" in e.field:
            j = int(e.field[len(key) + 1:-1])
            raise _Bad(f"{key}[{j + offset}]", e.reason.replace(f"position {j}", f"position {j + offset}")) from None
        raise


def _openai(rec: dict) -> Example:
    turns = _turn_list(rec, "messages")
    if all("from" in t and "role" not in t for t in turns):  # ShareGPT stored under "messages"
        return _sharegpt({**{k: v for k, v in rec.items() if k != "messages"}, "conversations": turns})
    system: Optional[str] = None
    messages: List[Message] = []
    for j, t in enumerate(turns):
        role = _str(t, "role", True, f"messages[{j}].role")
        if role == "system":
            if messages or system is not None:
                raise _Bad(f"messages[{j}].role", "a system message is only allowed first")
            system = _str(t, "content", True, f"messages[{j}].content")
            continue
        if role not in OPENAI_ROLES:
            raise _Bad(f"messages[{j}].role", f"unknown role {role!r}; expected system, "
                       f"{', '.join(OPENAI_ROLES)}")
        content = _str(t, "content", False, f"messages[{j}].content")
        if role == "assistant" and not content and t.get("tool_calls"):
            messages.append(Message("function_call", json.dumps(t["tool_calls"], ensure_ascii=False,
                                                                sort_keys=True)))
            continue
        if content is None:
            raise _Bad(f"messages[{j}].content", "missing")
        messages.append(Message(OPENAI_ROLES[role], content))
    _check_with_offset(messages, "messages", 1 if system is not None else 0)
    return Example(messages=messages, system=system or None, tools=_tools(rec),
                   meta=_meta(rec, "openai"))


def _text(rec: dict) -> Example:
    text = _str(rec, "text", True)
    if not text.strip():
        raise _Bad("text", "empty text")
    return Example(text=text, meta=_meta(rec, "text"))


_PARSERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _openai, "text": _text}


def detect_format(record: Any) -> Optional[str]:
    """The schema a record's keys indicate, or None."""
    if not isinstance(record, dict):
        return None
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def parse_record(record: Any, format: str, where: str = "record") -> Example:
    """Normalise one record of a known `format`; a problem is a `DataError` prefixed by `where`."""
    if format not in _PARSERS:
        raise DataError(f"{where}: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        return _PARSERS[format](record)
    except _Bad as e:
        raise DataError(f"{where}: field '{e.field}': {e.reason}") from None


# ----------------------------------------------------------------------------- files
def _records(path: Path) -> Iterator[Tuple[int, Optional[int], Any, Optional[str]]]:
    """Yield (record index, line or None, record, JSON error or None) from a .json or .jsonl file."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not raw.strip():
        raise DataError(f"{path}: empty file")
    as_lines = path.suffix.lower() == ".jsonl"
    if not as_lines:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            first = raw.lstrip().splitlines()[0] if raw.strip() else ""
            if e.msg == "Extra data" and first.startswith("{"):
                as_lines = True  # a JSON-lines file named .json
            else:
                raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not as_lines:
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
            if not data:
                raise DataError(f"{path}: no records (empty list)")
            for i, rec in enumerate(data):
                yield i, None, rec, None
            return
    i = 0
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield i, lineno, json.loads(line), None
        except json.JSONDecodeError as e:
            yield i, lineno, None, f"invalid JSON (column {e.colno}: {e.msg})"
        i += 1


def load_dataset(path: os.PathLike | str, format: str = "auto", skip_invalid: bool = False) -> ExampleList:
    """Load and validate every record of `path` (module docstring). Returns an `ExampleList`."""
    path = Path(path)
    if format not in FORMATS:
        raise DataError(f"{path}: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    report = LoadReport(path=str(path), format=format)
    out = ExampleList()
    fmt = None if format == "auto" else format
    for i, lineno, rec, json_err in _records(path):
        where = f"{path}: record {i}" + (f" (line {lineno})" if lineno is not None else "")
        report.n_records += 1
        try:
            if json_err is not None:
                raise DataError(f"{where}: {json_err}")
            if fmt is None:
                fmt = detect_format(rec)
                if fmt is None:
                    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                    raise DataError(f"{where}: cannot detect the format from keys {keys}; expected "
                                    "'instruction'/'output' (alpaca), 'conversations' (sharegpt), "
                                    "'messages' (openai) or 'text'")
                report.format = fmt
            out.append(parse_record(rec, fmt, where))
        except DataError as e:
            if not skip_invalid:
                raise
            report.n_skipped += 1
            if len(report.reasons) < 5:
                report.reasons.append(str(e))
    report.n_loaded = len(out)
    out.report = report
    if report.n_skipped:
        warnings.warn(report.summary(), stacklevel=2)
    if not out:
        raise DataError(f"{path}: no valid records" + (f" ({report.summary()})" if report.n_skipped else ""))
    return out
