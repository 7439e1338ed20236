"""Masking of task secrets in everything the agent writes or sends.

A ``SecretMasker`` is built from the secret values of a task (``secrets_of``
collects them). It replaces every occurrence of a secret with ``****``, and
also the forms a secret takes when a program prints it encoded:

- base64, standard and URL-safe, with and without padding, including the part
  that stays the same when the secret sits inside a longer base64 text at any
  of the three byte alignments;
- URL encoding (``%XX``, with ``+`` or ``%20`` for spaces);
- JSON string escaping, once and twice (JSON inside JSON);
- base64 of the JSON-escaped secret, which covers Docker's X-Registry-Auth
  header.

Registry logins add ``username:password`` as a secret of its own, so the
base64 ``auth`` field of a Docker ``config.json`` is masked too.

Where occurrences of secrets overlap, the whole union is masked, so no part of
either secret is left in clear.

A ``StreamMasker`` masks one output stream that arrives in pieces. It holds back
the last ``max_form_length - 1`` bytes of each write, so a secret split across
two writes is still masked. ``flush()`` releases the rest when the stream ends.
When no form of any secret contains a line feed, everything up to the last line
feed is released at once, so line-oriented output is not delayed.

Secrets shorter than ``MIN_SECRET_LENGTH`` characters are rejected by
``check_secret_lengths``: masking them would blank out ordinary words in every
log, and leaving them unmasked would leak them.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from urllib.parse import quote, quote_plus

from stella.agent.v1 import result_pb2, task_pb2
from stella_agent.errors import InvalidTaskError

MASK = b"****"
MIN_SECRET_LENGTH = 6
"""Secrets shorter than this many characters are rejected."""

MAX_PENDING_BYTES = 1024 * 1024
"""Maximum bytes a StreamMasker holds back while one masked span keeps growing."""


def encoded_forms(secret: str) -> set[str]:
    """Return the secret and every encoded form of it that is masked."""
    forms = {secret}
    # surrogatepass keeps lone surrogates, which a str may contain, encodable.
    forms.add(quote(secret, safe="", errors="surrogatepass"))
    forms.add(quote(secret, errors="surrogatepass"))
    forms.add(quote_plus(secret, safe="", errors="surrogatepass"))
    escaped = json.dumps(secret)[1:-1]
    forms.add(escaped)
    forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
    forms.add(json.dumps(escaped)[1:-1])
    raw = secret.encode("utf-8", "surrogatepass")
    forms |= _base64_forms(raw)
    forms |= _base64_forms(escaped.encode("ascii"))
    forms.discard("")
    return forms


def _base64_forms(raw: bytes) -> set[str]:
    """Return the base64 forms of `raw` as whole text and inside longer text.

    Inside a longer base64 text the secret starts at byte offset 0, 1 or 2 of a
    3-byte group. For each offset, only the characters whose 6 bits come from
    the secret alone are the same in every text, so those are kept.
    """
    whole = base64.b64encode(raw).decode("ascii")
    forms = {whole, whole.rstrip("=")}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode("ascii")
        first = -(-8 * offset // 6)
        end = 8 * (offset + len(raw)) // 6
        forms.add(encoded[first:end])
    forms |= {form.replace("+", "-").replace("/", "_") for form in forms}
    forms.discard("")
    return forms


class SecretMasker:
    """Replaces a fixed set of secrets and their encoded forms with ``****``.

    Immutable after construction, so one instance may be used from any thread.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = tuple(sorted({secret for secret in secrets if secret}))
        forms: set[bytes] = set()
        for secret in self.secrets:
            forms |= {
                form.encode("utf-8", "surrogatepass") for form in encoded_forms(secret)
            }
        # Longest first, so that at each position the longest form matches.
        ordered = sorted(forms, key=lambda form: (-len(form), form))
        self.max_form_length = len(ordered[0]) if ordered else 0
        """Length in bytes of the longest masked form."""
        self.forms_contain_newline = any(b"\n" in form for form in ordered)
        self._pattern: re.Pattern[bytes] | None = None
        if ordered:
            self._pattern = re.compile(b"|".join(re.escape(form) for form in ordered))

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __call__(self, data: bytes) -> bytes:
        return self.mask_bytes(data)

    def spans(self, data: bytes) -> list[tuple[int, int]]:
        """Return the merged [start, end) ranges of `data` that hold secrets."""
        if self._pattern is None:
            return []
        merged: list[tuple[int, int]] = []
        position = 0
        # Searching again from the byte after each match start finds
        # overlapping occurrences too.
        while (match := self._pattern.search(data, position)) is not None:
            start, end = match.span()
            if merged and start <= merged[-1][1]:
                if end > merged[-1][1]:
                    merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
            position = start + 1
        return merged

    def mask_bytes(self, data: bytes) -> bytes:
        """Return `data` with every secret replaced by ``****``."""
        return _replace_spans(data, self.spans(data))

    def mask_text(self, text: str) -> str:
        """Return `text` with every secret replaced by ``****``."""
        if self._pattern is None or not text:
            return text
        # UTF-8 is self-synchronizing: a span that matches the bytes of a whole
        # form starts and ends on character boundaries, so decoding succeeds.
        data = text.encode("utf-8", "surrogatepass")
        return self.mask_bytes(data).decode("utf-8", "surrogatepass")

    def stream(self) -> StreamMasker:
        """Return a masker for one stream that arrives in pieces."""
        return StreamMasker(self)


def _replace_spans(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    if not spans:
        return data
    parts: list[bytes] = []
    position = 0
    for start, end in spans:
        parts.append(data[position:start])
        parts.append(MASK)
        position = end
    parts.append(data[position:])
    return b"".join(parts)


class StreamMasker:
    """Masks one stream written in pieces, such as a container's stdout.

    ``write`` returns the masked bytes that are safe to pass on and keeps the
    rest; ``flush`` returns the kept bytes, masked, when the stream ends. Safe
    to call from several threads.
    """

    def __init__(self, masker: SecretMasker) -> None:
        self._masker = masker
        self._hold = max(masker.max_form_length - 1, 0)
        self._pending = b""
        self._lock = threading.Lock()

    @property
    def pending_bytes(self) -> int:
        """Bytes held back until the next write or flush."""
        return len(self._pending)

    def write(self, data: bytes) -> bytes:
        """Add `data` to the stream and return what can be passed on now."""
        with self._lock:
            if not self._masker:
                return data
            buffer = self._pending + data
            spans = self._masker.spans(buffer)
            cut = self._safe_cut(buffer, spans)
            self._pending = buffer[cut:]
            return _replace_spans(buffer[:cut], [s for s in spans if s[0] < cut])

    def flush(self) -> bytes:
        """Return the held-back bytes, masked, and empty the buffer."""
        with self._lock:
            buffer, self._pending = self._pending, b""
            return self._masker.mask_bytes(buffer)

    def _safe_cut(self, buffer: bytes, spans: list[tuple[int, int]]) -> int:
        """Return how many leading bytes of `buffer` no later write can change.

        An occurrence starting before len - hold fits entirely in the buffer,
        so only the last `hold` bytes may begin a secret still arriving. A
        masked span that crosses the cut is held back whole.
        """
        cut = len(buffer) - self._hold
        if not self._masker.forms_contain_newline:
            cut = max(cut, buffer.rfind(b"\n") + 1)
        if cut <= 0:
            return 0
        for start, end in spans:
            if start < cut < end:
                if start > 0 or len(buffer) < MAX_PENDING_BYTES:
                    return start
                # NOTE: a span that keeps growing past MAX_PENDING_BYTES is
                # released; a secret starting inside it and ending after it
                # could then show its tail unmasked.
                return end
        return cut


def secrets_of(
    task: task_pb2.AgentTask, credentials: task_pb2.Credentials
) -> dict[str, str]:
    """Return the secret values of a task by a label naming where each is from.

    Collects registry passwords and identity tokens, ``username:password`` of
    each registry login, the values of ``Credentials.secrets``, and the
    environment values that the deploy or rollback config names in
    ``secret_environment`` (also in the deploy's hooks). Empty values are left
    out. The labels never contain a secret value.
    """
    found: dict[str, str] = {}
    for auth in credentials.registries:
        host = auth.registry or "(no host)"
        found[f"registry {host} password"] = auth.password
        found[f"registry {host} identity token"] = auth.identity_token
        if auth.username and auth.password:
            found[f"registry {host} login"] = f"{auth.username}:{auth.password}"
    for name, value in credentials.secrets.items():
        found[f"secret {name}"] = value

    payload = task.WhichOneof("payload")
    if payload == "deploy":
        config = task.deploy.config
        hooks = [task.deploy.hooks.pre_deploy, task.deploy.hooks.post_deploy]
        environments = [config.environment, *(hook.environment for hook in hooks)]
        found.update(_secret_environment(config.secret_environment, environments))
    elif payload == "rollback":
        config = task.rollback.config
        found.update(
            _secret_environment(config.secret_environment, [config.environment])
        )
    return {label: value for label, value in found.items() if value}


def _secret_environment(
    names: Iterable[str], environments: list[Mapping[str, str]]
) -> dict[str, str]:
    found: dict[str, str] = {}
    for index, environment in enumerate(environments):
        where = "environment" if index == 0 else f"hook {index} environment"
        for name in names:
            if name in environment:
                found[f"{where} {name}"] = environment[name]
    return found


def check_secret_lengths(secrets: Mapping[str, str]) -> None:
    """Raise InvalidTaskError when a secret is shorter than MIN_SECRET_LENGTH.

    `secrets` maps labels to values, as ``secrets_of`` returns them. The error
    (error_type ``secret_too_short``) names the labels, never the values.
    Empty values are allowed, because there is nothing to leak.
    """
    short = sorted(
        label
        for label, value in secrets.items()
        if value and len(value) < MIN_SECRET_LENGTH
    )
    if short:
        raise InvalidTaskError(
            f"secrets shorter than {MIN_SECRET_LENGTH} characters cannot be masked "
            f"reliably: {', '.join(short)}; use longer values, or remove them from "
            "secret_environment if they are not secret",
            error_type="secret_too_short",
        )


def mask_result(result: result_pb2.TaskResult, masker: SecretMasker) -> None:
    """Mask the text fields of a result in place: error, logs and outputs."""
    if not masker:
        return
    result.error = masker.mask_text(result.error)
    result.logs = masker.mask_text(result.logs)
    outputs = {
        masker.mask_text(key): masker.mask_text(value)
        for key, value in result.outputs.items()
    }
    result.outputs.clear()
    result.outputs.update(outputs)


class SecretRegistry:
    """Secrets of the tasks running now, for outputs shared by all tasks.

    The agent's own log and the audit log are not tied to one task, so they
    mask with the union of every running task's secrets. Safe to use from
    several threads.
    """

    def __init__(self) -> None:
        self._by_owner: dict[str, tuple[str, ...]] = {}
        self._masker = SecretMasker(())
        self._lock = threading.Lock()

    @property
    def masker(self) -> SecretMasker:
        """A masker for the secrets registered now."""
        return self._masker

    def add(self, owner: str, secrets: Iterable[str]) -> None:
        """Register the secrets of `owner`, usually a task id."""
        with self._lock:
            self._by_owner[owner] = tuple(secrets)
            self._rebuild()

    def remove(self, owner: str) -> None:
        """Forget the secrets of `owner`; unknown owners are ignored."""
        with self._lock:
            if self._by_owner.pop(owner, None) is not None:
                self._rebuild()

    def mask_text(self, text: str) -> str:
        """Return `text` with every registered secret masked."""
        return self._masker.mask_text(text)

    def mask_bytes(self, data: bytes) -> bytes:
        """Return `data` with every registered secret masked."""
        return self._masker.mask_bytes(data)

    def _rebuild(self) -> None:
        values = {value for group in self._by_owner.values() for value in group}
        self._masker = SecretMasker(values)


class MaskingLogFilter(logging.Filter):
    """A logging filter that masks registered secrets in each record.

    Attach it to handlers, not loggers: a logger's filters do not see records
    that propagate from child loggers. It formats the message, the exception
    text and the stack text, masks them and stores the result in the record.
    Values passed with ``extra=`` are not masked.
    """

    def __init__(self, registry: SecretRegistry) -> None:
        super().__init__()
        self._registry = registry

    def filter(self, record: logging.LogRecord) -> bool:
        masker = self._registry.masker
        if not masker:
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            # Arguments that do not fit the format: the handler reports that.
            return True
        record.msg = masker.mask_text(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = masker.mask_text(record.exc_text)
        if record.stack_info:
            record.stack_info = masker.mask_text(record.stack_info)
        return True
