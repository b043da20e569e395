"""One Settings object: every setting is one env var (RMSERVE_X), one flag (--x) and one help line."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rmserve.cache.redis_url import parse_redis_url

PrecisionChoice = Literal["auto", "fp32", "bf16", "fp16", "int8"]
S = TypeVar("S", bound=BaseSettings)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RMSERVE_", extra="forbid", frozen=True)

    models: str | None = Field(
        None,
        description="bundles to serve: a path, or name=path,name2=path2 (unset: the bundled default model)",
    )
    composites: Path | None = Field(
        None,
        description="YAML file of composites: models made of served bundles and rules (docs/composites.md)",
    )
    default_model: str | None = Field(
        None,
        description="model (bundle or composite) of routes that name none: /get_reward, /v1/reward, "
        "/classify, and /v1/score without model (unset: the bundle named default, else the only one)",
    )
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    provider: str = Field(
        "auto",
        description="inference backend: auto (a GPU backend when one is present, else the CPU backend "
        "ranked first: openvino, then cpu), cpu (ONNX Runtime), openvino, or cuda (ONNX Runtime's CUDA)",
    )
    precision: PrecisionChoice = Field(
        "auto", description="auto, fp32 (exact), bf16, fp16, int8; reduced ones only behind the quality gate"
    )
    gate_min_agreement: float = Field(
        0.99,
        ge=0,
        le=1,
        description="quality gate: pairwise-order agreement with fp32 a reduced precision needs",
    )
    gate_min_spearman: float = Field(
        0.995,
        ge=-1,
        le=1,
        description="quality gate: Spearman correlation with fp32 a reduced precision needs",
    )
    threads: int | None = Field(
        None, ge=1, description="inference threads (default: the CPUs this process may use)"
    )
    streams: int | None = Field(
        None,
        ge=1,
        le=64,
        description="CPU forward passes run side by side, sharing the threads (default: by CPU count)",
    )
    max_batch_tokens: int | None = Field(
        None, ge=16, description="padded-token budget of one forward pass (default: by the backend)"
    )
    max_wait_ms: float = Field(0.0, ge=0, le=1000, description="how long the batcher waits to fill a batch")
    max_queue_items: int = Field(
        1024, ge=1, description="items waiting for the model before new requests get 429"
    )
    max_items_per_request: int = Field(512, ge=1, description="items one request may carry (more: 413)")
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="largest request body accepted (more: 413)"
    )
    max_inflight_body_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="bytes of request bodies held at once by all requests; beyond it new bodies get 429",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection that sends no complete request headers within this is closed"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body not fully received this long after arrival gets 408"
    )
    max_chars_per_item: int = Field(200_000, ge=1, description="characters one item may carry (more: 413)")
    max_tokens_per_request: int = Field(
        1_000_000, ge=1, description="tokens one request may carry after truncation (more: 413)"
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="default deadline of a request; X-Request-Timeout overrides it (lower only)"
    )
    cache: Literal["auto", "memory", "redis", "off"] = Field(
        "auto", description="score cache: auto (redis when a URL is set, else in-process), memory, redis, off"
    )
    redis_url: SecretStr | None = Field(
        None,
        description="redis-py URL: redis://, rediss://, redis+sentinel://, redis+cluster:// (docs/cache.md)",
    )
    cache_ttl_s: int = Field(
        7 * 24 * 3600, ge=1, description="score cache TTL in seconds (jittered by up to 10%)"
    )
    cache_prefix: str = Field(
        "rmserve:", description="prefix of every Redis key this service reads and writes"
    )
    cache_timeout_ms: float = Field(
        50.0,
        gt=0,
        le=10_000,
        description="deadline of one Redis lookup on the request path; slower is a miss",
    )
    cache_connect_timeout_ms: float = Field(
        50.0, gt=0, le=10_000, description="deadline to open a Redis connection on the request path"
    )
    cache_pool_size: int = Field(32, ge=1, description="Redis connections for lookups (and lookups at once)")
    cache_write_buffer: int = Field(
        65_536,
        ge=1,
        description="scores waiting to be written to Redis; beyond it writes are dropped and counted",
    )
    cache_breaker_failures: int = Field(
        5, ge=1, description="consecutive Redis failures that open the circuit (Redis bypassed)"
    )
    cache_breaker_cooldown_s: float = Field(
        5.0, gt=0, description="how long an open circuit bypasses Redis before one probe may try it"
    )
    cache_max_items: int = Field(200_000, ge=0, description="entries kept by the in-process cache")
    api_keys: SecretStr | None = Field(None, description="comma-separated API keys (unset: no auth)")
    api_keys_file: Path | None = Field(
        None, description="file of API keys, one per line (Kubernetes secrets)"
    )
    drain_grace_s: float = Field(
        20.0,
        ge=0,
        description="on SIGTERM or Ctrl-C, how long accepted work may take to finish; "
        "still waiting then: 503",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_bodies: bool = Field(False, description="log request texts (debug only: they may be private)")
    log_probes: bool = Field(
        False,
        description="access lines for /health/live and /health/ready too (probes poll every few seconds)",
    )
    get_reward_timeout_s: float = Field(
        170.0,
        gt=0,
        description="default deadline of /get_reward, under OpenRLHF's 180 s timeout (waits for queue room)",
    )
    retemplate: bool = Field(
        True,
        description="render policy chat markup (ChatML, Llama-3, [INST], Gemma, HH) in the bundle's template",
    )
    prefix_reuse: bool = Field(
        True,
        description="compute a prefix shared by items (a GRPO group's prompt, a growing solution) once, "
        "where the bundle and engine allow it (docs/prefix-reuse.md)",
    )
    prefix_cache_mb: int | None = Field(
        None,
        ge=1,
        description="memory for cached prefixes' keys and values, per model (default: 1/16 of the "
        "memory this process may use, 64 MB to 4096 MB)",
    )
    prefix_cache_ttl_s: float = Field(600.0, gt=0, description="a cached prefix unused this long is dropped")

    @field_validator("models")
    @classmethod
    def _models_spec(cls, value: str | None) -> str | None:
        if value is not None:
            parse_models(value)
        return value

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        if value != "auto":
            from rmserve.engines.registry import backend  # the engine records, read when needed

            backend(value)  # ValueError naming the known ones
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_redis_url(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _cache_needs_url(self) -> Settings:
        if self.cache == "redis" and self.redis_url is None:
            raise ValueError("cache=redis needs RMSERVE_REDIS_URL")
        return self

    def model_paths(self, default: Path) -> dict[str, Path]:
        """name -> bundle directory for every bundle to serve."""
        if self.models is None:
            return {"default": default}
        return parse_models(self.models)

    def cache_backend(self) -> str:
        if self.cache == "auto":
            return "redis" if self.redis_url is not None else "memory"
        return self.cache

    def public(self) -> dict[str, Any]:
        """The effective configuration for /info: secrets redacted."""
        out = self.model_dump(mode="json")
        out["api_keys"] = "***" if self.api_keys is not None else None
        out["redis_url"] = redact_url(self.redis_url.get_secret_value()) if self.redis_url else None
        return out


def parse_models(spec: str) -> dict[str, Path]:
    """``path`` or ``name=path,name2=path2`` -> {name: path}."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        raise ValueError("RMSERVE_MODELS is empty")
    if len(entries) == 1 and "=" not in entries[0]:
        return {"default": Path(entries[0]).expanduser()}
    out: dict[str, Path] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"RMSERVE_MODELS entry {entry!r} is not name=path")
        if name.strip() in out:
            raise ValueError(f"RMSERVE_MODELS names {name.strip()!r} twice")
        out[name.strip()] = Path(path.strip()).expanduser()
    return out


def redact_url(url: str) -> str:
    """The URL with its password (userinfo or ``?...password=``) replaced by ***."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not (at and ":" in userinfo) and "password" not in parts.query.lower():
        return url
    if at and ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    query = "&".join(
        f"{name}=***" if "password" in name.lower() else f"{name}{eq}{value}"
        for name, eq, value in (q.partition("=") for q in parts.query.split("&") if q)
    )
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{hosts}", query=query))


def default_text(value: Any) -> str:
    """A setting's default as ``--help`` shows it: ``unset`` for None, lowercase booleans."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


# Settings whose default is a rule: ``--help`` adds what the rule gives on this machine.
_RULE_DEFAULTS = ("threads", "streams", "max_batch_tokens")


def defaults_here() -> dict[str, str]:
    """What the defaults of ``_RULE_DEFAULTS`` come to on this machine, as ``--help`` shows them."""
    from rmserve.engines.base import available_cpus
    from rmserve.engines.registry import backends
    from rmserve.engines.select import default_streams

    cpus = available_cpus()
    per_backend = ", ".join(f"{b.name} {b.batch_tokens}" for b in backends().values())
    return {
        "threads": f"{cpus} on this machine",
        "streams": f"{default_streams(cpus)} on this machine, with {cpus} threads",
        "max_batch_tokens": per_backend or "no backend installed",
    }


def add_settings_arguments(parser: argparse.ArgumentParser, model: type[BaseSettings] = Settings) -> None:
    """One flag per setting of ``model``, named after its env var (RMSERVE_MAX_WAIT_MS is --max-wait-ms),
    its help line ending in its default (where the description does not say it already; a rule's value
    on this machine added) and its env var; a setting of a few values takes only those."""
    here = defaults_here() if set(_RULE_DEFAULTS) & set(model.model_fields) else {}
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = str(model.model_config.get("env_prefix", "")) + name.upper()
        description = field.description or ""
        if name in here:
            description = f"{description.removesuffix(')')}: {here[name]})"
        said = field.default is None and ("(default:" in description or "(unset:" in description)
        default = "" if said else f" (default: {default_text(field.default)})"
        help_text = f"{description}{default} [env {env}]".replace("%", "%%")  # argparse formats help
        if field.annotation is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
            metavar = None if choices else name.upper()  # argparse then shows the choices
            parser.add_argument(
                flag, dest=name, default=None, choices=choices, metavar=metavar, help=help_text
            )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags override env vars; both are validated by the same model."""
    return model_from_args(Settings, args)


def model_from_args(model: type[S], args: argparse.Namespace) -> S:
    """``model`` (a settings class) from the flags given, over its env vars."""
    given = {n: getattr(args, n) for n in model.model_fields if getattr(args, n, None) is not None}
    return model(**given)


def explain_invalid(exc: ValidationError | ValueError, args: argparse.Namespace | None = None) -> str:
    """What is wrong with the settings, one line per problem, with no secret in it: the values given
    are never echoed, and every API key and Redis password given (by env or flag) is replaced by ***."""
    if isinstance(exc, ValidationError):
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            lines.append(f"  {where}: {str(err['msg']).removeprefix('Value error, ')}")
        text = "\n".join(lines)
    else:
        text = f"  {exc}"
    for secret in sorted(_given_secrets(args), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _given_secrets(args: argparse.Namespace | None) -> set[str]:
    given = {
        name: [os.environ.get("RMSERVE_" + name.upper()), getattr(args, name, None)]
        for name in ("api_keys", "redis_url")
    }
    found: set[str] = set()
    for keys in filter(None, given["api_keys"]):
        found |= {k.strip() for k in keys.replace(",", "\n").splitlines() if k.strip()}
    for url in filter(None, given["redis_url"]):
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        if ":" in userinfo:
            found.add(userinfo.partition(":")[2])
        query = (q.partition("=") for q in parts.query.split("&"))
        found |= {value for name, _, value in query if "password" in name.lower() and value}
    return {s for s in found if s}
