"""SentencePiece tokenizers and chat templates with exact loss masks.

`Tokenizer` wraps a SentencePiece model (Kudo & Richardson 2018, arXiv:1808.06226), the format of
the `tokenizer.model` file shipped with Llama-2, TinyLlama and Mistral checkpoints. It can load
such a file or train a new one; trained ones follow the Llama recipe (BPE, digits split one by one,
byte fallback so that every string encodes, identity normalisation, a dummy-prefix space) and
reserve the first four ids:

    0 <unk>   1 <s> (bos)   2 </s> (eos)   3 <pad>

Padding. Llama-family files have no `<pad>` piece. `pad_id` is then the id of `<unk>` (0), or eos
when there is no unk either. Padding never reaches the loss (labels are -100 there) nor attention
(the mask is 0 there), so its id only has to be a valid row of the embedding; unk is preferred over
eos so that a search for eos in a padded batch never hits padding.

Chat templates. `encode_chat` turns a conversation into `input_ids` and a `loss_mask` that is True
exactly on the tokens the model must learn to produce: each assistant answer (role "assistant" or
"function_call") and the eos that closes it. Everything else (system text, tool descriptions,
user and observation turns, role headers, bos) is False. The template is built from segments that
are encoded separately, one `encode` call per segment, so the mask boundary is a token boundary by
construction and never depends on how BPE merges across it. Three templates:

  "default" (this repository's own; one header line per turn):
      <s>{system}\\n### User: {user}\\n### Assistant: {answer}</s>### User: {user}\\n### Assistant: ...
    segments: [bos] enc("{system}\\n### User: {user}\\n### Assistant:") | enc("{answer}") [eos] |
              enc("### User: {user}\\n### Assistant:") | ...
    An observation turn uses the header "### Observation:" instead of "### User:". The answer's
    leading space is the SentencePiece dummy prefix, so "Assistant: Paris" tokenizes as it would in
    running text. Tools text is appended to the system part as "Tools: {tools}".

  "llama2" (Meta's Llama-2-chat format, bos/eos as ids, never as text; contents are stripped):
      <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer}</s><s>[INST] {user} [/INST] ...
    segments: [bos] enc("[INST] <<SYS>>...{user} [/INST]") | enc("{answer}") [eos] | [bos] ...
    The system block goes into the first user turn only. Meta's reference code encodes
    "{answer} " with a trailing space, which adds one "\u2581" token before eos; we leave it out
    (the eos follows the answer's last token). Llama-2 has no tool roles: an observation is
    rendered as a user turn, a function call as an assistant turn.

  "plain" (no markup, for cloze probes and base models):
      <s>{system}\\n{user} {answer}</s>{user} {answer}</s>
    segments: [bos] enc("{system}\\n{user}") | enc("{answer}") [eos] | enc("{user}") | ...

Turns must alternate user side ("user", "observation") and assistant side ("assistant",
"function_call"), starting on the user side; a leading "system" message is taken as the system
prompt. With `add_generation_prompt=True` the conversation must end on the user side and the
assistant header is appended (for "llama2" and "plain" the prompt already ends where the answer
starts).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from .errors import CheckpointError, ConfigError, DataError
from .fileio import atomic_write

TOKENIZER_FILE = "tokenizer.model"
PAD_PIECE = "<pad>"

USER_SIDE = ("user", "observation")
ASSISTANT_SIDE = ("assistant", "function_call")
CHAT_TEMPLATES = ("default", "llama2", "plain")


class Tokenizer:
    """A SentencePiece model with Llama conventions (see the module docstring)."""

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        import sentencepiece as spm

        self.source = str(source)
        self._proto = bytes(model_proto)
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(self._proto)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError with its own text
            raise CheckpointError(f"{self.source}: not a valid sentencepiece model ({e})") from None
        if sp.get_piece_size() == 0:
            raise CheckpointError(f"{self.source}: sentencepiece model has an empty vocabulary")
        for what, i in (("bos", sp.bos_id()), ("eos", sp.eos_id())):
            if i < 0:
                raise CheckpointError(f"{self.source}: sentencepiece model defines no {what} piece; "
                                      "peftlab's templates need both bos and eos")
        self.sp = sp

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def load(cls, path: os.PathLike | str) -> "Tokenizer":
        """Load `path` (a `tokenizer.model` file, or a folder that holds one)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file not found")
        data = path.read_bytes()
        if not data:
            raise CheckpointError(f"{path}: tokenizer file is empty")
        return cls(data, source=str(path))

    @classmethod
    def train(cls, texts: Iterable[str], out_path: Optional[os.PathLike | str], vocab_size: int,
              model_type: str = "bpe", user_defined_symbols: Sequence[str] = (), seed: int = 0,
              character_coverage: float = 1.0, max_sentence_length: int = 1 << 16,
              num_threads: int = 1) -> "Tokenizer":
        """Train a tokenizer on `texts` and write it to `out_path` (skipped when None).

        Deterministic: the same texts and arguments give the same bytes. Each text is one
        SentencePiece "sentence" (newlines inside it are ordinary characters). Pieces in
        `user_defined_symbols` are always single tokens; prefix one with "\u2581" (the
        SentencePiece space) to make the word-initial form, as a word after a space is encoded,
        a single token: "\u2581Valdoria".
        """
        import sentencepiece as spm

        if model_type not in ("bpe", "unigram"):
            raise ConfigError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
        checked: List[str] = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DataError(f"tokenizer training text {i}: expected str, got {type(t).__name__}")
            if t:
                checked.append(t)
        if not checked:
            raise DataError("tokenizer training texts: no non-empty text given")
        spm.set_random_generator_seed(int(seed))
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(checked), model_writer=buf, vocab_size=int(vocab_size),
                model_type=model_type, user_defined_symbols=list(user_defined_symbols),
                byte_fallback=True, normalization_rule_name="identity", split_digits=True,
                add_dummy_prefix=True, remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, split_by_whitespace=True,
                split_by_unicode_script=True, split_by_number=True, max_sentencepiece_length=16,
                character_coverage=character_coverage, max_sentence_length=max_sentence_length,
                input_sentence_size=0, shuffle_input_sentence=False, num_threads=num_threads,
                unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece=PAD_PIECE,
                hard_vocab_limit=True, minloglevel=2)
        except RuntimeError as e:
            raise ConfigError(f"sentencepiece training failed (vocab_size={vocab_size}): {e}") from None
        tok = cls(buf.getvalue(), source=str(out_path) if out_path is not None else "<trained>")
        if out_path is not None:
            tok._write(Path(out_path))
        return tok

    def save(self, directory: os.PathLike | str) -> Path:
        """Write `tokenizer.model` into `directory` (atomically) and return its path."""
        path = Path(directory) / TOKENIZER_FILE
        self._write(path)
        return path

    def _write(self, path: Path) -> None:
        with atomic_write(path, "wb") as f:
            f.write(self._proto)

    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (the bytes of `tokenizer.model`)."""
        return self._proto

    # ------------------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def pad_id(self) -> int:
        """`<pad>` if the model has one, else unk, else eos (module docstring, "Padding")."""
        pid = self.sp.pad_id()
        if pid >= 0:
            return pid
        unk = self.sp.unk_id()
        byname = self.sp.piece_to_id(PAD_PIECE)
        if byname != unk and byname >= 0:
            return byname
        return unk if unk >= 0 else self.eos_id

    @property
    def special_ids(self) -> frozenset:
        """Control ids (bos, eos, pad): dropped by `decode(skip_special=True)`."""
        return frozenset(i for i in (self.bos_id, self.eos_id, self.sp.pad_id(), self.pad_id)
                         if i >= 0 and self.sp.is_control(i))

    def id_to_piece(self, i: int) -> str:
        self._check_id(i)
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        """Id of `piece`, or `unk_id` when the vocabulary has no such piece."""
        return self.sp.piece_to_id(piece)

    def _check_id(self, i: int) -> None:
        if not 0 <= int(i) < self.vocab_size:
            raise DataError(f"{self.source}: token id {i} is outside the vocabulary [0, {self.vocab_size})")

    # -------------------------------------------------------------------------- encode, decode
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        """Token ids of `text` (dummy-prefix space added, as Llama does), optionally framed."""
        if not isinstance(text, str):
            raise DataError(f"encode: expected str, got {type(text).__name__}")
        ids = list(self.sp.encode(text)) if text else []
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def tokenize(self, text: str) -> List[str]:
        """The pieces of `text` (for inspection)."""
        return [self.sp.id_to_piece(i) for i in self.encode(text)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`. With `skip_special=False` control tokens appear as their pieces (<s>)."""
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        special = self.special_ids
        if skip_special:
            return self.sp.decode([i for i in ids if i not in special])
        out, run = [], []
        for i in ids:
            if i in special:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


# -------------------------------------------------------------------------------- chat templates
def _role_content(m: Any, i: int) -> Tuple[str, str]:
    if isinstance(m, dict):
        role, content = m.get("role"), m.get("content")
    else:
        role, content = getattr(m, "role", None), getattr(m, "content", None)
    if not isinstance(role, str):
        raise DataError(f"messages[{i}].role: expected a string, got {role!r}")
    if not isinstance(content, str):
        raise DataError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
    return role, content


def _default_system(system: Optional[str], tools: Optional[str]) -> str:
    parts = [p for p in (system, f"Tools: {tools}" if tools else None) if p]
    return "\n".join(parts)


class _Segments:
    """Accumulates (ids, trained) segments into input_ids and loss_mask."""

    def __init__(self) -> None:
        self.ids: List[int] = []
        self.mask: List[bool] = []

    def add(self, ids: Sequence[int], trained: bool) -> None:
        self.ids.extend(ids)
        self.mask.extend([trained] * len(ids))


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Any], system: Optional[str] = None,
                template: str = "default", add_generation_prompt: bool = False,
                tools: Optional[str] = None) -> Tuple[List[int], List[bool]]:
    """Encode a conversation; return `(input_ids, loss_mask)` (see the module docstring).

    `messages` are `Message` objects or dicts with `role` and `content`. `loss_mask[i]` is True
    iff token i belongs to an assistant-side answer or is the eos that ends one.
    """
    if template not in CHAT_TEMPLATES:
        raise ConfigError(f"unknown chat template {template!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    turns = [_role_content(m, i) for i, m in enumerate(messages)]
    offset = 0
    if turns and turns[0][0] == "system":
        if system is not None:
            raise DataError("messages[0]: a system message and a system argument were both given")
        system = turns[0][1]
        turns, offset = turns[1:], 1
    for j, (role, _) in enumerate(turns):
        expected = USER_SIDE if j % 2 == 0 else ASSISTANT_SIDE
        if role not in expected:
            raise DataError(f"messages[{j + offset}].role: expected {' or '.join(expected)} at this "
                            f"position (turns alternate user side / assistant side), got {role!r}")
    if add_generation_prompt and turns and turns[-1][0] in ASSISTANT_SIDE:
        raise DataError(f"messages[{len(turns) - 1 + offset}]: add_generation_prompt needs a "
                        "conversation that ends on the user side")
    sys_text = _default_system(system, tools)
    enc, bos, eos = tokenizer.encode, tokenizer.bos_id, tokenizer.eos_id
    out = _Segments()

    if template == "llama2":
        first = True
        prompt = None
        for role, content in turns:
            if role in USER_SIDE:
                sys_block = f"<<SYS>>\n{sys_text.strip()}\n<</SYS>>\n\n" if first and sys_text else ""
                prompt = f"[INST] {sys_block}{content.strip()} [/INST]"
                first = False
            else:
                out.add([bos] + enc(prompt), False)
                out.add(enc(content.strip()) + [eos], True)
                prompt = None
        if prompt is not None:
            out.add([bos] + enc(prompt), False)
        return out.ids, out.mask

    # "default" and "plain" share one layout and differ only in the headers.
    if template == "default":
        headers = {"user": "### User: ", "observation": "### Observation: "}
        gen_prompt = "\n### Assistant:"
    else:
        headers = {"user": "", "observation": ""}
        gen_prompt = ""
    out.add([bos], False)
    pending = sys_text + "\n" if sys_text else ""
    for role, content in turns:
        if role in USER_SIDE:
            pending += headers[role] + content
        else:
            out.add(enc(pending + gen_prompt), False)
            out.add(enc(content) + [eos], True)
            pending = ""
    if pending:
        out.add(enc(pending + (gen_prompt if add_generation_prompt else "")), False)
    return out.ids, out.mask
