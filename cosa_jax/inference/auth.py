"""Who may set the safety config: API keys -> the configs they are authorised to use.

CoSA (cosalign.md §1) puts the safety config in the system prompt and lets only authorised
users set it. This module is the whole policy, host-side and JAX-free, so it can be tested
and audited on its own. The registry file is JSON::

    {
      "allow_anonymous": false,
      "configs": {"game-studio": "You may describe violence in fiction ...",
                  "kids": "Keep every answer suitable for children ..."},
      "keys": {
        "sk-studio": {"configs": ["game-studio"]},       # names from the shared "configs" table
        "sk-lab":    {"configs": {"lab": "Chemistry safety text ..."}},  # or inline name -> text
        "sk-admin":  {"configs": "*"},                   # any system message
        "sk-reader": {}                                  # no right: always the default config
      }
    }

Rules (one request):
- With a registry, an unknown key is 401; a missing key is 401 unless ``allow_anonymous``.
- A key with rights may send a system message whose text is one of its configs (whitespace at
  the ends ignored), or any text with ``"*"``; it may also name a config with the request field
  ``safety_config`` instead of sending its text (a ``"*"`` key: any config of the shared table).
- A key (or anonymous caller) without that right gets the deployment's default config as the
  system prompt; a system message from it is refused with 403.
- Without a registry the server is open: system messages pass through unchanged, and the
  default config (if any) fills in only when the request has no system message.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

ANY_CONFIG = "*"
SYSTEM_ROLES = ("system", "developer")


class AuthError(Exception):
    """A request the policy refuses; ``status`` is the HTTP code (401 or 403 or 400)."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class RegistryError(ValueError):
    """A registry file that cannot be used (names the file and the field)."""


@dataclasses.dataclass(frozen=True)
class KeyRights:
    """The configs one key may set: ``any_config`` or the ``configs`` name -> text table."""
    name: str
    configs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    any_config: bool = False

    @property
    def may_set_config(self) -> bool:
        return self.any_config or bool(self.configs)


@dataclasses.dataclass(frozen=True)
class Registry:
    keys: Mapping[str, KeyRights]
    allow_anonymous: bool = False
    configs: Mapping[str, str] = dataclasses.field(default_factory=dict)  # the shared table


def _config_table(raw: Any, where: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: expected an object mapping config names to texts")
    for name, text in raw.items():
        if not isinstance(text, str) or not text.strip():
            raise RegistryError(f"{where}.{name}: a config must be a non-empty string")
    return dict(raw)


def parse_registry(data: Any, source: str = "registry") -> Registry:
    """Validate a decoded registry; every error names ``source`` and the offending field."""
    if not isinstance(data, dict):
        raise RegistryError(f"{source}: the top level must be a JSON object")
    unknown = sorted(set(data) - {"allow_anonymous", "configs", "keys"})
    if unknown:
        raise RegistryError(f"{source}: unknown field(s) {unknown}; "
                            "known: allow_anonymous, configs, keys")
    shared = _config_table(data.get("configs", {}), f"{source}: configs")
    allow_anonymous = data.get("allow_anonymous", False)
    if not isinstance(allow_anonymous, bool):
        raise RegistryError(f"{source}: allow_anonymous must be true or false")
    raw_keys = data.get("keys")
    if not isinstance(raw_keys, dict) or not raw_keys:
        raise RegistryError(f"{source}: 'keys' must be a non-empty object mapping API keys to rights")
    keys = {}
    for i, (key, spec) in enumerate(raw_keys.items()):
        where = f"{source}: keys[{i}]"  # never echo the secret itself
        if not isinstance(key, str) or not key.strip():
            raise RegistryError(f"{where}: an API key must be a non-empty string")
        if not isinstance(spec, dict):
            raise RegistryError(f"{where}: expected an object like {{\"configs\": [...]}}")
        extra = sorted(set(spec) - {"configs", "name"})
        if extra:
            raise RegistryError(f"{where}: unknown field(s) {extra}; known: configs, name")
        name = str(spec.get("name", f"key{i}"))
        raw = spec.get("configs", {})
        if raw == ANY_CONFIG:
            keys[key] = KeyRights(name, {}, any_config=True)
        elif isinstance(raw, list):
            missing = [c for c in raw if c not in shared]
            if missing:
                raise RegistryError(f"{where}.configs: {missing} not in the registry's 'configs' "
                                    f"table (known: {sorted(shared)})")
            keys[key] = KeyRights(name, {c: shared[c] for c in raw})
        elif isinstance(raw, dict):
            keys[key] = KeyRights(name, _config_table(raw, f"{where}.configs"))
        else:
            raise RegistryError(f"{where}.configs: expected \"*\", a list of config names, or an "
                                "object mapping names to texts")
    return Registry(keys, allow_anonymous, shared)


def load_registry(path: str | Path) -> Registry:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{path}: registry file not found") from None
    except json.JSONDecodeError as e:
        raise RegistryError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return parse_registry(data, str(path))


def message_text(content: Any, where: str) -> str:
    """The text of an OpenAI message content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise AuthError(400, f"{where}.content[{j}]: only text parts are supported",
                                "invalid_request_error")
            parts.append(part["text"])
        return "".join(parts)
    raise AuthError(400, f"{where}.content: expected a string or a list of text parts",
                    "invalid_request_error")


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` header (None when absent or empty)."""
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


def _key_rights(api_key: str | None, registry: Registry) -> KeyRights:
    """What ``api_key`` may do under ``registry``; a missing or unknown key is a 401."""
    if api_key is None:
        if not registry.allow_anonymous:
            raise AuthError(401, "missing API key: send 'Authorization: Bearer KEY' with a key "
                            "from the server's registry", "invalid_api_key")
        return KeyRights("anonymous")
    if api_key in registry.keys:
        return registry.keys[api_key]
    raise AuthError(401, "unknown API key (not in the server's registry)", "invalid_api_key")


def apply_policy(messages: Sequence[Mapping[str, str]], api_key: str | None,
                 registry: Registry | None, default_config: str | None,
                 requested_config: str | None = None) -> list[dict[str, str]]:
    """The messages the model will see, after the authorised-config rules above.

    ``messages`` are already normalised ({role, content: str}); at most one system message,
    and it comes first. Raises AuthError (401 / 403 / 400) when the request is refused.
    """
    system = [m for m in messages if m["role"] in SYSTEM_ROLES]
    rest = [dict(m) for m in messages if m["role"] not in SYSTEM_ROLES]
    sent = system[0]["content"] if system else None

    if registry is None:
        if requested_config is not None:
            raise AuthError(400, "safety_config names a registered config, but this server has no "
                            "--config.auth_registry; send the config as the system message instead",
                            "invalid_request_error")
        chosen = sent if sent is not None else default_config
        return ([{"role": "system", "content": chosen}] if chosen is not None else []) + rest

    rights = _key_rights(api_key, registry)

    if requested_config is not None:
        if sent is not None:
            raise AuthError(400, "send either a system message or safety_config, not both",
                            "invalid_request_error")
        # A "*" key may name any config of the shared table; others only their own.
        named = {**registry.configs, **rights.configs} if rights.any_config else rights.configs
        if requested_config not in named:
            if rights.any_config:
                raise AuthError(400, f"safety_config {requested_config!r} is not in the registry "
                                f"(known: {sorted(named)})", "invalid_request_error")
            raise AuthError(403, f"this API key may not use safety config {requested_config!r}"
                            + (f" (allowed: {sorted(rights.configs)})" if rights.configs else
                               "; it has no right to set a safety config"), "config_not_authorised")
        sent = named[requested_config]
    elif sent is not None:
        if not rights.may_set_config:
            raise AuthError(403, "this API key may not set the safety config: remove the system "
                            "message (the deployment's default config applies)",
                            "config_not_authorised")
        allowed = {t.strip() for t in rights.configs.values()}
        if not rights.any_config and sent.strip() not in allowed:
            raise AuthError(403, "the system message is not one of the safety configs this API key "
                            f"may use (allowed: {sorted(rights.configs)}); send one of them verbatim "
                            "or name it with safety_config", "config_not_authorised")
    chosen = sent if sent is not None else default_config
    return ([{"role": "system", "content": chosen}] if chosen is not None else []) + rest


def check_raw_prompt(api_key: str | None, registry: Registry | None) -> None:
    """A raw prompt (``/v1/completions``) skips the chat template, so it can hold any system
    turn: with a registry only a key that may set any config (``"*"``) may send one."""
    if registry is None:
        return
    rights = _key_rights(api_key, registry)
    if not rights.any_config:
        raise AuthError(403, "raw prompts (/v1/completions) bypass the safety-config policy: this "
                        "API key may use /v1/chat/completions only (raw prompts need a key with "
                        "\"configs\": \"*\")", "config_not_authorised")


def policy_on_raw_messages(messages: Any, api_key: str | None, registry: Registry | None,
                           default_config: str | None, requested_config: str | None = None
                           ) -> list[Any]:
    """``apply_policy`` for a gateway: the same rules, but every non-system message is passed
    on untouched (whatever fields the upstream understands); only the system turn is decided
    here. Malformed system messages raise AuthError(400)."""
    if not isinstance(messages, list) or not messages:
        raise AuthError(400, "'messages' must be a non-empty list of {role, content} objects",
                        "invalid_request_error")
    system_at = [i for i, m in enumerate(messages)
                 if isinstance(m, dict) and m.get("role") in SYSTEM_ROLES]
    if len(system_at) > 1 or (system_at and system_at[0] != 0):
        raise AuthError(400, "at most one system message is supported, and it must come first "
                        "(it holds the safety config)", "invalid_request_error")
    if len(system_at) == len(messages):
        raise AuthError(400, "'messages' holds no user message", "invalid_request_error")
    normalised = [{"role": "system", "content": message_text(messages[0].get("content"),
                                                             "messages[0]")}] if system_at else []
    rest = [m for i, m in enumerate(messages) if i not in system_at]
    decided = apply_policy(normalised + [{"role": "user", "content": ""}], api_key, registry,
                           default_config, requested_config)
    system = [m for m in decided if m["role"] == "system"]
    return system + rest
